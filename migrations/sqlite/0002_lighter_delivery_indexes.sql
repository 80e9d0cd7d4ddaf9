-- Every state change rewrote the (subscription_key, state) entry; only failed deliveries are looked up by
-- subscription on the hot path of an operator's repair ("retry failed"), so index just those.
DROP INDEX deliveries_subscription;
CREATE INDEX deliveries_failed ON deliveries (subscription_key) WHERE state = 'failed';
