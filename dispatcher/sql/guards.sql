-- Named statements of the spend guards (functions in migrations/0023_spend_guards.sql; since
-- 0031 the settings and counters live on the accounts row, account_guards is a view of it).

-- name: guards_get
-- An account's guard settings and state (no row: no guard set).
SELECT g.daily_spend_cap, g.allowed_countries, g.max_credits_per_message,
       g.velocity_window_seconds, g.velocity_multiple::float8 AS velocity_multiple,
       g.velocity_min_credits, g.transactional_reserve, g.transactional_overdraft,
       CASE WHEN g.spent_day = (now() AT TIME ZONE 'UTC')::date THEN g.spent_today ELSE 0 END
           AS spent_today,
       CASE WHEN g.capped_until > now() THEN g.capped_until END AS capped_until,
       g.velocity_held_at
  FROM account_guards g WHERE g.account_id = $1;

-- name: guards_set
SELECT account_id FROM guard_settings_set($1, $2, $3::text[], $4, $5, $6::numeric, $7, $8, $9);

-- name: guards_release_velocity
SELECT guard_release_velocity($1);

-- name: reserve_guarded
SELECT job_id, status, amount, available
  FROM reserve_guarded($1, $2::text[], $3::text[], $4::bigint[], $5::text[]);

-- name: guard_held_accounts_due
-- Accounts with jobs a guard held whose hold has ended (the next UTC day began, or an owner
-- released the velocity hold): the resumer's sweep releases them.
SELECT DISTINCT j.account_id AS id
  FROM jobs j
  JOIN account_guards g ON g.account_id = j.account_id
 WHERE j.status = 'held' AND j.reason IN ('daily_cap', 'velocity')
   AND (g.capped_until IS NULL OR g.capped_until <= now())
   AND (j.reason = 'daily_cap' OR g.velocity_held_at IS NULL);
