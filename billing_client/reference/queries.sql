-- name: lock_schema
SELECT pg_advisory_xact_lock(hashtext('billing_ref.schema'));

-- name: record_event
INSERT INTO billing_ref.processed_events (event_id, event_type, account, episode)
VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: set_event_decision
UPDATE billing_ref.processed_events SET decision = $2, topup_id = $3 WHERE event_id = $1;

-- name: lock_account
INSERT INTO billing_ref.accounts AS a (account) VALUES ($1)
ON CONFLICT (account) DO UPDATE SET last_event_at = now()
RETURNING a.account;

-- name: account_state
-- The facts a top-up decision needs; the caller holds the account's row lock.
SELECT EXISTS (SELECT 1 FROM billing_ref.topups
                WHERE account = $1 AND status = 'in_flight') AS in_flight,
       last.status AS episode_status,
       last.closed_at AS episode_closed_at,
       (SELECT max(updated_at) FROM billing_ref.payment_methods
         WHERE account = $1 AND purpose = 'auto_recharge') AS methods_changed_at
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (
       SELECT t.status,
              CASE WHEN t.status = 'succeeded' THEN o.published_at ELSE t.updated_at END
                AS closed_at
         FROM billing_ref.topups t
         LEFT JOIN billing_ref.outbox o ON o.event_id = t.grant_event_id
        WHERE t.account = $1 AND t.episode = $2
        ORDER BY t.id DESC
        LIMIT 1) AS last ON true;

-- name: insert_topup
INSERT INTO billing_ref.topups
       (account, episode, trigger_type, trigger_event_id, amount, status, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, 'in_flight', now())
ON CONFLICT (account) WHERE status = 'in_flight' DO NOTHING
RETURNING id;

-- name: claim_due_topup
-- Lease the oldest due top-up: its next_attempt_at moves past the lease while we charge.
UPDATE billing_ref.topups
   SET next_attempt_at = now() + make_interval(secs => $1::float8), updated_at = now()
 WHERE id = (SELECT id FROM billing_ref.topups
              WHERE status = 'in_flight' AND next_attempt_at <= now()
              ORDER BY next_attempt_at
              LIMIT 1
                FOR UPDATE SKIP LOCKED)
RETURNING id, account, episode, amount, attempts, trigger_event_id;

-- name: seconds_until_due
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
  FROM billing_ref.topups WHERE status = 'in_flight';

-- name: methods_for
SELECT role, token FROM billing_ref.payment_methods WHERE account = $1 AND purpose = $2;

-- name: last_charge
SELECT idempotency_key, status FROM billing_ref.charges
 WHERE topup_id = $1 AND role = $2
 ORDER BY id DESC
 LIMIT 1;

-- name: insert_charge
INSERT INTO billing_ref.charges (topup_id, attempt, role, idempotency_key, status)
VALUES ($1, $2, $3, $4, 'pending')
RETURNING id;

-- name: settle_charge
UPDATE billing_ref.charges SET status = $2, charge_id = $3, updated_at = now() WHERE id = $1;

-- name: topup_succeeded
UPDATE billing_ref.topups
   SET status = 'succeeded', method_used = $3, payment_reference = $4, grant_event_id = $5,
       last_reason = NULL, next_attempt_at = NULL, updated_at = now()
 WHERE id = $1 AND attempts = $2 AND status = 'in_flight'
RETURNING id;

-- name: insert_invoice
INSERT INTO billing_ref.invoices
       (topup_id, account, amount, credits, payment_reference, charge_id, method)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: topup_attempt_failed
-- Conditional on the attempt count we claimed, so a stale worker changes nothing.
UPDATE billing_ref.topups
   SET attempts = attempts + 1, status = $3, last_reason = $4, method_used = $5,
       next_attempt_at = $6, updated_at = now()
 WHERE id = $1 AND attempts = $2 AND status = 'in_flight'
RETURNING id;

-- name: outbox_insert
INSERT INTO billing_ref.outbox (event_id, routing_key, body) VALUES ($1, $2, $3);

-- name: outbox_claim
SELECT id, event_id, routing_key, body
  FROM billing_ref.outbox
 WHERE published_at IS NULL
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: outbox_mark_published
UPDATE billing_ref.outbox SET published_at = now() WHERE id = ANY($1::bigint[]);

-- name: set_method
INSERT INTO billing_ref.payment_methods (account, purpose, role, token)
VALUES ($1, $2, $3, $4)
ON CONFLICT (account, purpose, role)
DO UPDATE SET token = EXCLUDED.token, updated_at = now();

-- name: delete_method
DELETE FROM billing_ref.payment_methods WHERE account = $1 AND purpose = $2 AND role = $3;

-- name: invoices_for
SELECT id, account, amount, credits, payment_reference, charge_id, method, created_at
  FROM billing_ref.invoices
 WHERE account = $1
 ORDER BY id;
