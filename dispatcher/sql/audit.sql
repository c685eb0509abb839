-- Ledger audit: each query returns one row per violation (empty = clean).

-- name: audit_balances_vs_ledger
SELECT a.id AS account_id,
       format('balances differ from ledger: sub %s vs %s, purchased %s vs %s, debt %s vs %s, '
              'reserved %s vs %s', a.sub_available, coalesce(l.sub, 0), a.purchased_available,
              coalesce(l.purchased, 0), a.debt, coalesce(l.debt, 0), a.reserved,
              coalesce(l.reserved, 0)) AS problem
  FROM accounts a
  LEFT JOIN (SELECT account_id, sum(sub_delta) AS sub, sum(purchased_delta) AS purchased,
                    sum(debt_delta) AS debt, sum(reserved_delta) AS reserved
               FROM ledger GROUP BY account_id) l ON l.account_id = a.id
 WHERE a.sub_available <> coalesce(l.sub, 0) OR a.purchased_available <> coalesce(l.purchased, 0)
    OR a.debt <> coalesce(l.debt, 0) OR a.reserved <> coalesce(l.reserved, 0);

-- name: audit_buckets_vs_ledger
SELECT b.account_id,
       format('bucket %s (%s) remaining %s but its ledger rows sum to %s', b.id, b.reference,
              b.remaining, coalesce(l.total, 0)) AS problem
  FROM credit_buckets b
  LEFT JOIN (SELECT u.bucket_id, sum(u.delta) AS total
               FROM ledger, unnest(bucket_ids, bucket_deltas) AS u(bucket_id, delta)
              GROUP BY u.bucket_id) l ON l.bucket_id = b.id
 WHERE b.remaining <> coalesce(l.total, 0);

-- name: audit_purchased_vs_buckets
SELECT a.id AS account_id,
       format('purchased_available %s but buckets hold %s', a.purchased_available,
              coalesce(b.total, 0)) AS problem
  FROM accounts a
  LEFT JOIN (SELECT account_id, sum(remaining) AS total FROM credit_buckets GROUP BY account_id) b
         ON b.account_id = a.id
 WHERE a.purchased_available <> coalesce(b.total, 0);

-- name: audit_reserved_vs_pending
SELECT a.id AS account_id,
       format('reserved %s but pending reservations sum to %s', a.reserved,
              coalesce(r.total, 0)) AS problem
  FROM accounts a
  LEFT JOIN (SELECT account_id, sum(amount) AS total FROM reservations
              WHERE status = 'pending' GROUP BY account_id) r ON r.account_id = a.id
 WHERE a.reserved <> coalesce(r.total, 0);

-- name: audit_reservation_rows
SELECT r.account_id,
       format('reservation %s is %s with %s reserve row(s) and %s settle row(s)', r.job_id,
              r.status, count(*) FILTER (WHERE l.kind = 'reserve'),
              count(*) FILTER (WHERE l.kind IN ('capture', 'release'))) AS problem
  FROM reservations r
  LEFT JOIN ledger l ON l.job_id = r.job_id AND l.kind IN ('reserve', 'capture', 'release')
 GROUP BY r.job_id, r.account_id, r.status
HAVING count(*) FILTER (WHERE l.kind = 'reserve') <> 1
    OR count(*) FILTER (WHERE l.kind IN ('capture', 'release'))
       <> CASE WHEN r.status = 'pending' THEN 0 ELSE 1 END
    OR bool_or(l.kind = 'capture') IS DISTINCT FROM (r.status = 'captured')
       AND r.status <> 'pending';

-- name: audit_settle_rows_without_reservation
SELECT l.account_id, format('ledger row %s settles job %s which has no reservation',
                            l.reference, l.job_id) AS problem
  FROM ledger l
 WHERE l.kind IN ('capture', 'release')
   AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.job_id = l.job_id);

-- name: audit_debt_only_from_settlement
-- (or a reservation into the transactional overdraft, for exactly its debt part: 0023)
SELECT account_id, format('ledger row %s (%s) creates debt %s; only a capture may',
                          reference, kind, debt_delta) AS problem
  FROM ledger l
 WHERE debt_delta > 0 AND kind <> 'capture'
   AND NOT (kind = 'reserve' AND debt_delta = (SELECT r.debt_part FROM reservations r
                                                WHERE r.job_id = l.job_id));

-- name: audit_negative_balances
SELECT id AS account_id, format('negative balance: sub %s purchased %s reserved %s',
                                sub_available, purchased_available, reserved) AS problem
  FROM accounts
 WHERE sub_available < 0 OR purchased_available < 0 OR reserved < 0;

-- name: audit_ledger_amounts
-- Each row's amount is what its deltas moved (and its buckets add up to its purchased part), so
-- editing a capture's amount, or one delta alone, shows. Capture and release: the reservation
-- leaves `reserved`; what did not come back (to subscription, buckets, forfeited, or repaid
-- debt) is what was spent.
SELECT account_id,
       format('ledger row %s (%s) says amount %s but its deltas move %s', reference, kind,
              amount, moved) AS problem
  FROM (SELECT l.*,
               CASE WHEN kind = 'reserve' THEN -(sub_delta + purchased_delta) + debt_delta
                    WHEN kind IN ('capture', 'release')
                        THEN -(reserved_delta + sub_delta + purchased_delta + forfeited - debt_delta)
                    WHEN kind LIKE 'grant\_%' THEN purchased_delta - debt_delta
                    WHEN kind IN ('subscription_allocation', 'plan_upgrade')
                        THEN sub_delta - debt_delta
                    WHEN kind = 'subscription_forfeit' THEN forfeited
                    WHEN kind = 'refund' THEN -purchased_delta
               END AS moved,
               (SELECT coalesce(sum(d), 0) FROM unnest(l.bucket_deltas) AS d) AS in_buckets
          FROM ledger l) x
 WHERE amount IS DISTINCT FROM moved
    OR purchased_delta <> in_buckets
    OR (kind = 'reserve' AND (reserved_delta <> amount OR debt_delta < 0))
    OR (kind IN ('capture', 'release') AND reserved_delta >= 0)
    OR (kind = 'release' AND amount <> 0)
    OR (kind = 'subscription_forfeit' AND sub_delta <> -amount);

-- name: audit_ledger_vs_reservations
-- The reserve row holds the reservation's amount; the settle row releases exactly that amount
-- and captures what the reservation says was captured.
SELECT l.account_id,
       format('ledger row %s (%s, amount %s, reserved_delta %s) disagrees with reservation %s '
              '(amount %s, captured %s)', l.reference, l.kind, l.amount, l.reserved_delta,
              r.job_id, r.amount, r.captured) AS problem
  FROM ledger l
  JOIN reservations r ON r.job_id = l.job_id
 WHERE (l.kind = 'reserve' AND (l.amount <> r.amount OR l.account_id <> r.account_id))
    OR (l.kind IN ('capture', 'release')
        AND (-l.reserved_delta <> r.amount OR l.amount <> coalesce(r.captured, 0)
             OR l.account_id <> r.account_id));

-- name: audit_final_cost_vs_captures
-- What a job says it cost is what its settlement took: a job with no settlement row (held,
-- never reserved) can only have cost nothing.
SELECT j.account_id,
       format('job %s has final_cost %s but its settlement %s', j.job_id, j.final_cost,
              CASE WHEN l.id IS NULL THEN 'is missing'
                   ELSE format('(%s) moved %s', l.kind, l.amount) END) AS problem
  FROM jobs j
  LEFT JOIN ledger l ON l.reference = 'settle:' || j.job_id
 WHERE j.final_cost IS NOT NULL
   AND CASE WHEN l.id IS NULL THEN j.final_cost <> 0 ELSE l.amount <> j.final_cost END;

-- name: audit_ledger_guards
-- The triggers that keep the ledger append-only are there and enabled.
SELECT '*' AS account_id,
       format('ledger trigger %s is %s', g.name,
              CASE WHEN t.oid IS NULL THEN 'missing' ELSE 'disabled' END) AS problem
  FROM unnest(ARRAY['ledger_append_only', 'ledger_no_truncate']) AS g(name)
  LEFT JOIN pg_trigger t ON t.tgrelid = 'ledger'::regclass AND t.tgname = g.name
 WHERE t.oid IS NULL OR t.tgenabled = 'D';

-- name: audit_payment_grants
-- Grants that a payment produced (purchase, auto-recharge; adjustments are manual), by
-- payment reference (the ledger reference is `grant:<payment reference>`).
SELECT account_id, kind, substr(reference, 7) AS payment_reference, amount
  FROM ledger
 WHERE kind IN ('grant_purchase', 'grant_auto_recharge');

-- name: audit_billing_invoices
-- Run against the reference billing service's database: its record of every paid top-up. $1:
-- seconds an invoice may wait for its grant (credits.granted in flight) before it is missing.
SELECT account, credits, payment_reference, created_at < now() - make_interval(secs => $1)
       AS overdue
  FROM billing_ref.invoices;

-- name: audit_daily_spend_caps
-- No UTC day's reservations (from the ledger) passed the daily spend cap in force that day: the
-- highest of the cap in force when the day began and those set during it (none of them, or a
-- "no cap" among them: nothing to check). Spend guards, migration 0023.
WITH days AS (
    SELECT l.account_id,
           date_trunc('day', l.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day_start,
           sum(l.amount) AS reserved
      FROM ledger l
     WHERE l.kind = 'reserve'
       AND l.account_id IN (SELECT h.account_id FROM guard_cap_history h)
     GROUP BY 1, 2
)
SELECT d.account_id,
       format('reserved %s credits on %s (UTC), above the daily spend cap of %s', d.reserved,
              to_char(d.day_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'), c.allowed) AS problem
  FROM days d
 CROSS JOIN LATERAL (
       SELECT CASE WHEN bool_or(x.cap IS NULL) THEN NULL ELSE max(x.cap) END AS allowed
         FROM ((SELECT h.daily_spend_cap AS cap FROM guard_cap_history h
                 WHERE h.account_id = d.account_id AND h.set_at <= d.day_start
                 ORDER BY h.set_at DESC, h.id DESC LIMIT 1)
               UNION ALL
               SELECT h.daily_spend_cap FROM guard_cap_history h
                WHERE h.account_id = d.account_id AND h.set_at > d.day_start
                  AND h.set_at < d.day_start + interval '1 day') x) c
 WHERE d.reserved > c.allowed;
