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
-- Credits moved by ledger rows in (after, upto], by kind; the sampler lags one interval behind
-- the newest row so transactions still committing below it are counted.
SELECT kind, coalesce(sum(abs(amount)), 0)::bigint AS credits
  FROM ledger WHERE id > $1 AND id <= $2
 GROUP BY kind;
