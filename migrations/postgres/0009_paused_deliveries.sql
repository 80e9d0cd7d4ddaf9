-- Deliveries of an INACTIVE subscription or webhook wait as 'paused', out of the due index, until both are ACTIVE
-- again; they are found by subscription then. Only paused rows enter this index, so the hot path never writes it.
CREATE INDEX deliveries_paused ON deliveries (subscription_key) WHERE state = 'paused';
-- No delivery goes out unsigned: every application with a webhook and no key valid now gets one (a random
-- UUID, as POST /webhooks/secretkey makes), valid from this migration on. The next POST /webhooks/secretkey
-- rotates it.
INSERT INTO secret_keys (app_id, value, valid_from, created_at)
SELECT a.app_id, gen_random_uuid()::text, (extract(epoch FROM now()) * 1000)::bigint,
       (extract(epoch FROM now()) * 1000)::bigint
FROM (SELECT DISTINCT app_id FROM webhooks) a
WHERE NOT EXISTS (SELECT 1 FROM secret_keys k WHERE k.app_id = a.app_id
                    AND k.valid_from <= (extract(epoch FROM now()) * 1000)::bigint);
