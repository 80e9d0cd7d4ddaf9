-- An event's deliveries are found through the range of their ids, kept on the event, and retention walks the
-- primary key: the index on created_at went, and with it a page or two of every group commit's WAL.
ALTER TABLE events ADD COLUMN first_delivery INTEGER;
ALTER TABLE events ADD COLUMN last_delivery INTEGER;
UPDATE events SET first_delivery = m.lo, last_delivery = m.hi
  FROM (SELECT event_key, min(id) AS lo, max(id) AS hi FROM deliveries GROUP BY event_key) m
  WHERE events.event_key = m.event_key;
DROP INDEX deliveries_created;
