-- A claim rewrites a delivery's lease columns, which no index covers: with room left on the row's page the new
-- version stays on that page and no index entry is added (a HOT update). Freshly written pages were full.
ALTER TABLE deliveries SET (fillfactor = 70);
