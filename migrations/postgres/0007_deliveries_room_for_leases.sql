-- A claim leases the due deliveries in order, which are the consecutive rows of a few pages, all in one statement:
-- each new row version needs room on its own page, and the old versions are not free until the claim commits. At
-- fillfactor 70 a page had room for the leased versions of about 9 of its 21 rows (112 of a claim's 256 updates
-- were HOT); the rest were written again into every index of the table. At 50 every row's leased version fits
-- beside it. Rows already written keep their layout; new rows get the room.
ALTER TABLE deliveries SET (fillfactor = 50);
