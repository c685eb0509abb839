-- name: outbox_claim_billing
-- Billing events first: a top-up must not wait behind thousands of status events. One returned
-- as unroutable waits for its next_attempt_at, so it never blocks the rows behind it.
SELECT id, event_id, exchange, routing_key, body, attempts
  FROM outbox
 WHERE published_at IS NULL AND exchange = 'billing'
   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: outbox_claim
SELECT id, event_id, exchange, routing_key, body, attempts
  FROM outbox
 WHERE published_at IS NULL
   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: outbox_mark_published
UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: outbox_defer
-- Returned unroutable: try again after $2 seconds, doubling per attempt, at most $3.
UPDATE outbox
   SET attempts = attempts + 1,
       next_attempt_at = now() + make_interval(secs => least($3::float8,
                                                             $2::float8 * 2 ^ attempts))
 WHERE id = ANY($1::bigint[]);

-- name: outbox_backlog
-- unroutable: events the broker returned and that still wait for a queue; next_attempt_in:
-- seconds until the first of them is due again (NULL when none waits).
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS lag_seconds,
       count(*) FILTER (WHERE attempts > 0) AS unroutable,
       extract(epoch FROM min(next_attempt_at) - now())::float8 AS next_attempt_in
  FROM outbox WHERE published_at IS NULL;
