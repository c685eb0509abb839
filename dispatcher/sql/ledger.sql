-- Named statements of the credit ledger. The logic that must be safe under concurrency lives in
-- the plpgsql functions of migrations/0001_ledger.sql; these call them by name.

-- name: create_account
INSERT INTO accounts (id, name, allocation, cadence, renewal_day,
                      auto_recharge_enabled, auto_recharge_threshold, auto_recharge_amount)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: get_account
SELECT id, name, allocation, cadence, renewal_day, next_allocation, period_seq, period_start,
       period_end, sub_available, purchased_available, debt, reserved,
       sub_available + purchased_available - debt AS available,
       auto_recharge_enabled, auto_recharge_threshold, auto_recharge_amount, topup_at_zero,
       smart_encoding, created_at
  FROM accounts WHERE id = $1;

-- name: reserve_batch
SELECT job_id, status, amount, available FROM reserve_batch($1, $2::text[], $3::bigint[]);

-- name: settle_reservation
SELECT status, amount, captured, account_id FROM settle_reservation($1, $2);

-- name: grant_credits
SELECT status, bucket_id FROM grant_credits($1, $2, $3, $4);

-- name: start_subscription_period
SELECT status FROM start_subscription_period($1, $2, $3, $4, $5);

-- name: change_plan
SELECT status, sub_added FROM change_plan($1, $2);

-- name: refund_credits
SELECT status, refundable FROM refund_credits($1, $2, $3, $4);

-- name: get_reservation
SELECT job_id, account_id, amount, sub_part, period_seq, bucket_ids, bucket_parts, status,
       captured, created_at, settled_at
  FROM reservations WHERE job_id = $1;

-- name: list_buckets
SELECT id, kind, reference, granted, remaining, refunded, created_at
  FROM credit_buckets WHERE account_id = $1 ORDER BY id;

-- name: ledger_page
SELECT id, kind, reference, sub_delta, purchased_delta, debt_delta, reserved_delta, forfeited,
       amount, job_id, created_at
  FROM ledger
 WHERE account_id = $1 AND id > $2
 ORDER BY id
 LIMIT $3;

-- name: accounts_due_for_renewal
SELECT id, allocation, next_allocation, cadence, renewal_day, period_end
  FROM accounts
 WHERE period_end IS NOT NULL AND period_end <= $1
 ORDER BY id;

-- name: list_rates
SELECT channel, country, credits FROM rates ORDER BY channel, country;

-- name: set_rate
INSERT INTO rates (channel, country, credits) VALUES ($1, $2, $3)
ON CONFLICT (channel, country) DO UPDATE SET credits = EXCLUDED.credits, updated_at = now();

-- name: set_auto_recharge
UPDATE accounts
   SET auto_recharge_enabled = $2, auto_recharge_threshold = $3, auto_recharge_amount = $4,
       topup_at_zero = coalesce($5, topup_at_zero), auto_recharge_changed_at = now()
 WHERE id = $1
RETURNING id;

-- name: smart_encoding_accounts
SELECT id FROM accounts WHERE smart_encoding;

-- name: pause_auto_recharge
-- Billing paused auto-recharge after declines (topup.disabled): off here too, unless an owner
-- changed the settings after the ones billing saw ($2, null: never changed).
UPDATE accounts SET auto_recharge_enabled = false
 WHERE id = $1 AND auto_recharge_enabled
   AND auto_recharge_changed_at IS NOT DISTINCT FROM $2
RETURNING id;
