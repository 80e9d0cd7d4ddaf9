-- An event's deliveries are created with the event, in one transaction, and share its created_at: they are found
-- through that time on an index that only grows at its end. The index on the random eventKey cost every new
-- delivery a write to a random page of it.
DROP INDEX deliveries_event;
CREATE INDEX deliveries_created ON deliveries (created_at);
