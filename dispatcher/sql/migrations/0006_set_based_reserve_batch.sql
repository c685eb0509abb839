-- reserve_batch, set-based: the same arguments, result rows and rows written as 0001's version,
-- in one statement per batch instead of one credits_take (and one bucket update) per job.
--
-- Why: on one hot account the per-job loop updated the same bucket row up to 100 times per
-- batch while 31 other sessions queued on the account row holding old snapshots, so no dead
-- version could be pruned and every lookup walked all of them (~550 reservations/s; see
-- bench/RESULTS.md). Here each bucket is updated at most once per batch.
--
-- Semantics, unchanged (tests/integration/test_ledger_batch.py compares both versions):
-- * a job id that already holds a reservation answers 'existing' (this account) or 'conflict'
--   (another account) with that reservation's amount; a job id repeated inside the batch is
--   reserved at its first occurrence only, later ones answer 'existing' (or 'insufficient' when
--   the first one was);
-- * new jobs are reserved in order while the balance covers them; from the first one that does
--   not fit, every later new job is 'insufficient';
-- * credits come from the subscription first, then from buckets oldest first: job k of the
--   batch takes the interval [sum of earlier amounts, sum including its own) of that stream;
-- * one reservation and one ledger row ('reserve:' || job id) per reserved job, one account
--   update per batch; `available` is the balance after the row's job.
-- Locks, in order: the account row (every function that changes credits takes it first, so the
-- bucket rows are never contended), then the account's bucket rows, then the job ids' unique
-- index entries, inserted in job id order so two batches sharing foreign ids cannot deadlock.

-- Raise `message` unless `ok`; for checks inside a single SQL statement.
CREATE FUNCTION ledger_check(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION '%', message;
    END IF;
    RETURN true;
END $$;

-- plan_cache_mode: left to itself, plpgsql re-plans the big statement on every call of a small
-- batch (the custom plan looks cheaper than the generic one), ~1 ms here: single-job calls, the
-- pipeline's path, were 2x slower than 0001's. The generic plan is the one measured for batches.
CREATE OR REPLACE FUNCTION reserve_batch(p_account text, p_job_ids text[], p_amounts bigint[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    acct accounts%ROWTYPE;
    avail bigint;
    bad record;
    n integer := coalesce(array_length(p_job_ids, 1), 0);
BEGIN
    IF n <> coalesce(array_length(p_amounts, 1), 0) THEN
        RAISE EXCEPTION 'reserve_batch: % job ids but % amounts', n, array_length(p_amounts, 1);
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT u, 'unknown_account'::text, 0::bigint, 0::bigint
                       FROM unnest(p_job_ids) AS u;
        RETURN;
    END IF;
    SELECT u.x INTO bad FROM unnest(p_amounts) WITH ORDINALITY AS u(x, ord)
     WHERE u.x IS NULL OR u.x <= 0 ORDER BY u.ord LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'reserve_batch: amount must be positive, got %', bad.x;
    END IF;
    avail := acct.sub_available + acct.purchased_available - acct.debt;
    -- Built from window functions over the batch in order (plus one index probe per job id and
    -- a scan of the account's few spendable buckets per reserved job): no join between two
    -- batch-sized sets, whose generic-plan estimate (10 rows) would make it a quadratic loop.
    RETURN QUERY
    WITH seen AS (
        -- Every row of the batch, with the reservation its job id already holds, if any.
        SELECT u.jid, u.amt, u.ord, r.account_id AS prior_acc, r.amount AS prior_amt,
               row_number() OVER (PARTITION BY u.jid ORDER BY u.ord) = 1 AS first
          FROM unnest(p_job_ids, p_amounts) WITH ORDINALITY AS u(jid, amt, ord)
          LEFT JOIN reservations r ON r.job_id = u.jid
    ), stream AS (
        -- cum: credits asked for by new jobs (first occurrence, no reservation) up to this row.
        SELECT s.jid, s.amt, s.ord, s.prior_acc, s.prior_amt,
               s.first AND s.prior_acc IS NULL AS new,
               (sum(CASE WHEN s.first AND s.prior_acc IS NULL THEN s.amt ELSE 0 END)
                    OVER (ORDER BY s.ord))::bigint AS cum
          FROM seen s
    ), decided AS (
        -- Amounts are positive, so the new jobs that fit are exactly the prefix the balance
        -- covers: from the first one that does not fit, none does.
        SELECT t.jid, t.amt, t.ord, t.prior_acc, t.prior_amt, t.cum,
               t.new AND t.cum <= avail AS reserves
          FROM stream t
    ), outcome AS (
        SELECT d.jid, d.amt, d.ord, d.prior_acc, d.prior_amt, d.reserves,
               bool_or(d.reserves) OVER (PARTITION BY d.jid) AS taken,
               first_value(d.amt) OVER (PARTITION BY d.jid ORDER BY d.ord) AS first_amt,
               avail - (sum(CASE WHEN d.reserves THEN d.amt ELSE 0 END)
                            OVER (ORDER BY d.ord))::bigint AS avail_after
          FROM decided d
    ), buckets AS (
        -- Bucket b holds the interval [hi - remaining, hi) of the stream after the subscription.
        SELECT b.id, b.remaining,
               acct.sub_available + (sum(b.remaining) OVER (ORDER BY b.id))::bigint AS hi
          FROM credit_buckets b
         WHERE b.account_id = p_account AND b.remaining > 0
           AND EXISTS (SELECT 1 FROM decided d WHERE d.reserves AND d.cum > acct.sub_available)
    ), res AS (
        -- A reserved job takes the interval [cum - amt, cum) of the stream.
        SELECT d.jid, d.amt, d.ord,
               GREATEST(0, LEAST(d.cum, acct.sub_available) - (d.cum - d.amt)) AS sub_part,
               x.bids, x.bparts, x.bnegs, x.from_buckets
          FROM decided d
         CROSS JOIN LATERAL (
               SELECT coalesce(array_agg(p.id ORDER BY p.id), '{}') AS bids,
                      coalesce(array_agg(p.part ORDER BY p.id), '{}') AS bparts,
                      coalesce(array_agg(-p.part ORDER BY p.id), '{}') AS bnegs,
                      coalesce(sum(p.part), 0)::bigint AS from_buckets
                 FROM (SELECT bk.id, LEAST(d.cum, bk.hi)
                                     - GREATEST(d.cum - d.amt, bk.hi - bk.remaining) AS part
                         FROM buckets bk
                        WHERE bk.hi - bk.remaining < d.cum AND bk.hi > d.cum - d.amt) p
               ) x
         WHERE d.reserves
    ), bucket_upd AS (
        -- The batch as a whole takes [0, total): at most one update per bucket.
        UPDATE credit_buckets b
           SET remaining = b.remaining - (LEAST(bk.hi, t.total) - (bk.hi - bk.remaining))
          FROM buckets bk, (SELECT max(d.cum) AS total FROM decided d WHERE d.reserves) t
         WHERE b.id = bk.id AND bk.hi - bk.remaining < t.total
    ), ins_res AS (
        INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq,
                                  bucket_ids, bucket_parts)
        SELECT r.jid, p_account, r.amt, r.sub_part, acct.period_seq, r.bids, r.bparts
          FROM res r ORDER BY r.jid
    ), ins_led AS (
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta,
                            reserved_delta, bucket_ids, bucket_deltas, amount, job_id)
        SELECT p_account, 'reserve', 'reserve:' || r.jid, -r.sub_part, -r.from_buckets,
               r.amt, r.bids, r.bnegs, r.amt, r.jid
          FROM res r ORDER BY r.ord
    ), acc_upd AS (
        UPDATE accounts a
           SET sub_available = a.sub_available - t.sub_total,
               purchased_available = a.purchased_available - t.bucket_total,
               reserved = a.reserved + t.total
          FROM (SELECT sum(r.sub_part)::bigint AS sub_total,
                       sum(r.from_buckets)::bigint AS bucket_total,
                       sum(r.amt)::bigint AS total
                  FROM res r) t
         WHERE a.id = p_account AND t.total > 0
           -- purchased_available promised credits the buckets do not hold: never a silent
           -- partial take (0001 raised in credits_take for the same reason).
           AND ledger_check(t.sub_total + t.bucket_total = t.total,
                            'credits_take: insufficient credits for ' || p_account)
    )
    SELECT o.jid,
           (CASE WHEN o.prior_acc IS NOT NULL THEN
                     CASE WHEN o.prior_acc = p_account THEN 'existing' ELSE 'conflict' END
                 WHEN o.reserves THEN 'reserved'
                 WHEN o.taken THEN 'existing'
                 ELSE 'insufficient' END)::text,
           CASE WHEN o.prior_acc IS NOT NULL THEN o.prior_amt
                WHEN o.taken THEN o.first_amt
                ELSE o.amt END,
           o.avail_after
      FROM outcome o
     ORDER BY o.ord;
END $$;
