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
SELECT account_id, format('ledger row %s (%s) creates debt %s; only a capture may',
                          reference, kind, debt_delta) AS problem
  FROM ledger
 WHERE debt_delta > 0 AND kind <> 'capture';

-- name: audit_negative_balances
SELECT id AS account_id, format('negative balance: sub %s purchased %s reserved %s',
                                sub_available, purchased_available, reserved) AS problem
  FROM accounts
 WHERE sub_available < 0 OR purchased_available < 0 OR reserved < 0;
