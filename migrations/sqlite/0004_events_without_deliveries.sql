-- Retention finds the old events that no delivery refers to: those whose deliveries it removes (through
-- deliveries_created), and those that never had any (published with no active subscription), here. Only those
-- rows enter this index, so the publish path does not pay for it.
CREATE INDEX events_without_deliveries ON events (created_at) WHERE deliveries = 0;
