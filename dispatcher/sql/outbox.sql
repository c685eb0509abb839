-- name: outbox_claim_billing
-- Billing events first: a top-up must not wait behind thousands of status events.
SELECT id, event_id, exchange, routing_key, body
  FROM outbox
 WHERE published_at IS NULL AND exchange = 'billing'
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: outbox_claim
SELECT id, event_id, exchange, routing_key, body
  FROM outbox
 WHERE published_at IS NULL
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: outbox_mark_published
UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: outbox_backlog
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS lag_seconds
  FROM outbox WHERE published_at IS NULL;
