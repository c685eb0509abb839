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
       greatest((SELECT max(updated_at) FROM billing_ref.payment_methods
                  WHERE account = $1 AND purpose = 'auto_recharge'),
                a.owner_changed_at) AS methods_changed_at,
       a.paused_at IS NOT NULL AS paused,
       a.paused_settings_at,
       (a.capped_month = $3 AND a.capped_cap IS NOT DISTINCT FROM a.monthly_cap) AS capped
  FROM billing_ref.accounts a
  LEFT JOIN LATERAL (
       SELECT t.status,
              CASE WHEN t.status = 'succeeded' THEN o.published_at ELSE t.updated_at END
                AS closed_at
         FROM billing_ref.topups t
         LEFT JOIN billing_ref.outbox o ON o.event_id = t.grant_event_id
        WHERE t.account = $1 AND t.episode = $2
        ORDER BY t.id DESC
        LIMIT 1) AS last ON true
 WHERE a.account = $1;

-- name: insert_topup
INSERT INTO billing_ref.topups
       (account, episode, trigger_type, trigger_event_id, amount, status, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, 'in_flight', $6)
ON CONFLICT (account) WHERE status = 'in_flight' DO NOTHING
RETURNING id;

-- name: claim_due_topup
-- Lease the oldest due top-up: its next_attempt_at moves past the lease while we charge.
UPDATE billing_ref.topups
   SET next_attempt_at = $2::timestamptz + make_interval(secs => $1::float8),
       updated_at = now()
 WHERE id = (SELECT id FROM billing_ref.topups
              WHERE status = 'in_flight' AND next_attempt_at <= $2
              ORDER BY next_attempt_at
              LIMIT 1
                FOR UPDATE SKIP LOCKED)
RETURNING id, account, episode, amount, attempts, trigger_event_id;

-- name: seconds_until_due
SELECT extract(epoch FROM min(next_attempt_at) - $1::timestamptz)::float8
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
       (topup_id, account, amount, credits, payment_reference, charge_id, method, created_at,
        hourly_limit, monthly_cap, cap_unit)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

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

-- name: record_last_trigger
UPDATE billing_ref.accounts SET last_trigger = $2::jsonb WHERE account = $1;

-- name: lock_account_row
SELECT account FROM billing_ref.accounts WHERE account = $1 FOR UPDATE;

-- name: account_limits
-- The recharge safety state of one account; the caller holds its row lock. $2: an hour ago,
-- $3: the month's first instant, $4: the month (YYYY-MM), $5/$6: the service's default hourly
-- and decline limits.
SELECT a.paused_at IS NOT NULL AS paused,
       coalesce(a.hourly_limit, $5) AS hourly_limit,
       coalesce(a.decline_limit, $6) AS decline_limit,
       a.monthly_cap, a.cap_unit,
       (a.capped_month = $4 AND a.capped_cap IS NOT DISTINCT FROM a.monthly_cap) AS capped,
       h.charges AS charges_last_hour, h.oldest AS oldest_in_hour,
       m.used AS month_used
  FROM billing_ref.accounts a
  CROSS JOIN LATERAL (
       SELECT count(*) AS charges, min(i.created_at) AS oldest
         FROM billing_ref.invoices i WHERE i.account = a.account AND i.created_at > $2) h
  CROSS JOIN LATERAL (
       SELECT coalesce(sum(CASE WHEN a.cap_unit = 'money' THEN i.amount ELSE i.credits END), 0)
              ::bigint AS used
         FROM billing_ref.invoices i WHERE i.account = a.account AND i.created_at >= $3) m
 WHERE a.account = $1;

-- name: topup_unsettled
-- The top-up's latest request has an unknown outcome: the next request repeats its key.
SELECT status IN ('pending', 'timeout') FROM billing_ref.charges
 WHERE topup_id = $1 ORDER BY id DESC LIMIT 1;

-- name: topup_defer
UPDATE billing_ref.topups SET next_attempt_at = $3, last_reason = $4, updated_at = now()
 WHERE id = $1 AND attempts = $2 AND status = 'in_flight'
RETURNING id;

-- name: set_capped
UPDATE billing_ref.accounts SET capped_month = $2, capped_cap = $3 WHERE account = $1;

-- name: cap_notice
INSERT INTO billing_ref.cap_notices (account, month, level, cap, event_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING event_id;

-- name: record_decline
UPDATE billing_ref.accounts
   SET consecutive_declines = consecutive_declines + 1,
       decline_run = (decline_run || $2::jsonb)
 WHERE account = $1
RETURNING consecutive_declines, decline_run::text AS decline_run,
          coalesce(decline_limit, $3) AS decline_limit;

-- name: reset_declines
UPDATE billing_ref.accounts SET consecutive_declines = 0, decline_run = '[]'
 WHERE account = $1 AND consecutive_declines > 0;

-- name: pause_recharge
UPDATE billing_ref.accounts
   SET paused_at = $2,
       paused_settings_at = (last_trigger -> 'auto_recharge' ->> 'changed_at')::timestamptz
 WHERE account = $1 AND paused_at IS NULL
RETURNING account, paused_settings_at;

-- name: set_limits
-- NULL keeps a value, except $6 (clear the cap). Changing the cap lifts a reached cap.
-- owner_changed_at is compared with when top-ups closed (database time), so it is now() too.
UPDATE billing_ref.accounts
   SET hourly_limit = coalesce($2, hourly_limit),
       decline_limit = coalesce($3, decline_limit),
       monthly_cap = CASE WHEN $6 THEN NULL ELSE coalesce($4, monthly_cap) END,
       cap_unit = coalesce($5, cap_unit),
       owner_changed_at = now()
 WHERE account = $1
RETURNING account;

-- name: enable_recharge
UPDATE billing_ref.accounts
   SET paused_at = NULL, paused_settings_at = NULL, consecutive_declines = 0,
       decline_run = '[]', owner_changed_at = now()
 WHERE account = $1
RETURNING account;

-- name: last_trigger
SELECT last_trigger::text FROM billing_ref.accounts WHERE account = $1;

-- name: recharge_status
SELECT account, paused_at, consecutive_declines, decline_run::text AS decline_run,
       coalesce(hourly_limit, $2) AS hourly_limit, coalesce(decline_limit, $3) AS decline_limit,
       monthly_cap, cap_unit, capped_month, capped_cap, owner_changed_at
  FROM billing_ref.accounts WHERE account = $1;

-- name: audit_hourly_limit
-- No charge had more charges than its hourly limit in the hour up to and including it.
SELECT i.account, format('charge %s (%s) was the %s-th in an hour; the limit was %s',
                         i.payment_reference, i.created_at, w.n, i.hourly_limit) AS problem
  FROM billing_ref.invoices i
  CROSS JOIN LATERAL (
       SELECT count(*) AS n FROM billing_ref.invoices j
        WHERE j.account = i.account AND j.created_at > i.created_at - interval '1 hour'
          AND (j.created_at, j.id) <= (i.created_at, i.id)) w
 WHERE i.hourly_limit IS NOT NULL AND w.n > i.hourly_limit;

-- name: audit_monthly_cap
-- No charge took the month's total past the cap in force when it was made.
SELECT i.account, format('charge %s took %s to %s %s, past its cap of %s',
                         i.payment_reference, to_char(i.created_at AT TIME ZONE 'UTC', 'YYYY-MM'),
                         m.used, i.cap_unit, i.monthly_cap) AS problem
  FROM billing_ref.invoices i
  CROSS JOIN LATERAL (
       SELECT sum(CASE WHEN i.cap_unit = 'money' THEN j.amount ELSE j.credits END) AS used
         FROM billing_ref.invoices j
        WHERE j.account = i.account
          AND date_trunc('month', j.created_at AT TIME ZONE 'UTC')
              = date_trunc('month', i.created_at AT TIME ZONE 'UTC')
          AND (j.created_at, j.id) <= (i.created_at, i.id)) m
 WHERE i.monthly_cap IS NOT NULL AND m.used > i.monthly_cap;

-- name: audit_one_charge_per_topup
SELECT t.account, format('top-up %s moved money %s times', t.id, count(DISTINCT c.charge_id))
       AS problem
  FROM billing_ref.topups t JOIN billing_ref.charges c ON c.topup_id = t.id
 WHERE c.status = 'succeeded'
 GROUP BY t.id, t.account
HAVING count(DISTINCT c.charge_id) > 1;

-- name: audit_topup_invoice_grant
-- Every succeeded top-up has one invoice and one queued grant of the same credits, and back.
SELECT t.account, format('top-up %s (%s): %s invoice(s), %s grant(s)', t.id, t.status,
                         (SELECT count(*) FROM billing_ref.invoices i WHERE i.topup_id = t.id),
                         (SELECT count(*) FROM billing_ref.outbox o
                           WHERE o.event_id = t.grant_event_id)) AS problem
  FROM billing_ref.topups t
 WHERE (t.status = 'succeeded') <> EXISTS (SELECT 1 FROM billing_ref.invoices i
                                            WHERE i.topup_id = t.id
                                              AND i.payment_reference = t.payment_reference)
    OR (t.status = 'succeeded') <> EXISTS (
         SELECT 1 FROM billing_ref.outbox o
          WHERE o.event_id = t.grant_event_id AND o.routing_key = 'credits.granted'
            AND (o.body::jsonb ->> 'amount')::bigint = t.amount
            AND o.body::jsonb ->> 'payment_reference' = t.payment_reference);

-- name: audit_duplicate_grants
SELECT min(o.body::jsonb ->> 'account') AS account,
       format('payment reference %s is granted %s times', o.body::jsonb ->> 'payment_reference',
              count(*)) AS problem
  FROM billing_ref.outbox o
 WHERE o.routing_key = 'credits.granted'
 GROUP BY o.body::jsonb ->> 'payment_reference'
HAVING count(*) > 1;
