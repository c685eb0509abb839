-- Operations: the demo's views of one account, and the ledger flow behind the credit metrics.

-- name: demo_account_state
SELECT paused_at IS NOT NULL AS paused, sub_available + purchased_available - debt AS available,
       reserved
  FROM accounts WHERE id = $1;

-- name: demo_topups
SELECT amount, reference FROM ledger
 WHERE account_id = $1 AND kind = 'grant_auto_recharge'
 ORDER BY id;

-- name: ledger_high_water
SELECT coalesce(max(id), 0) FROM ledger;

-- name: ledger_flow
-- Credits moved by the ledger rows in (after, upto], by metric operation. A release row's
-- amount is 0; what went back is its reserved_delta, as for the unused part of a capture.
SELECT coalesce(sum(amount) FILTER (WHERE kind = 'reserve'), 0)::bigint AS reserved,
       coalesce(sum(amount) FILTER (WHERE kind = 'capture'), 0)::bigint AS captured,
       coalesce(sum(greatest(0, -reserved_delta - amount))
                FILTER (WHERE kind IN ('capture', 'release')), 0)::bigint AS released,
       coalesce(sum(amount) FILTER (WHERE kind LIKE 'grant\_%'
                OR kind IN ('subscription_allocation', 'plan_upgrade')), 0)::bigint AS granted,
       coalesce(sum(forfeited), 0)::bigint AS forfeited
  FROM ledger WHERE id > $1 AND id <= $2;

-- name: applied_migrations
-- What `dispatcher migrate` has applied (the table is missing on a database never migrated).
SELECT name FROM schema_migrations;

-- name: ping
-- Readiness and the consumer's outage probe: one round trip, nothing read; false on a server
-- that cannot take writes (a standby, or a primary fenced read-only).
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
