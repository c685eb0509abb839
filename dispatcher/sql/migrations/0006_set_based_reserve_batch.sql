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

CREATE OR REPLACE FUNCTION reserve_batch(p_account text, p_job_ids text[], p_amounts bigint[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
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
    RETURN QUERY
    WITH input AS (
        SELECT u.jid, u.amt, u.ord
          FROM unnest(p_job_ids, p_amounts) WITH ORDINALITY AS u(jid, amt, ord)
    ), firsts AS (
        -- The first occurrence of each job id: the only one that can reserve.
        SELECT DISTINCT ON (i.jid) i.jid, i.amt, i.ord FROM input i ORDER BY i.jid, i.ord
    ), prior AS (
        -- Job ids that already hold a reservation, on this account or another.
        SELECT f.ord, r.account_id AS acc, r.amount AS amt
          FROM firsts f JOIN reservations r ON r.job_id = f.jid
    ), fresh AS (
        SELECT f.jid, f.amt, f.ord, (sum(f.amt) OVER (ORDER BY f.ord))::bigint AS cum
          FROM firsts f WHERE NOT EXISTS (SELECT 1 FROM prior p WHERE p.ord = f.ord)
    ), ok AS (
        -- Amounts are positive, so this is the longest prefix of new jobs the balance covers.
        SELECT fr.jid, fr.amt, fr.ord, fr.cum FROM fresh fr WHERE fr.cum <= avail
    ), buckets AS (
        -- Bucket b holds the interval [hi - remaining, hi) of the stream after the subscription.
        SELECT b.id, b.remaining,
               acct.sub_available + (sum(b.remaining) OVER (ORDER BY b.id))::bigint AS hi
          FROM credit_buckets b
         WHERE b.account_id = p_account AND b.remaining > 0
           AND EXISTS (SELECT 1 FROM ok WHERE ok.cum > acct.sub_available)
    ), parts AS (
        SELECT o.ord, bk.id AS bucket_id,
               LEAST(o.cum, bk.hi) - GREATEST(o.cum - o.amt, bk.hi - bk.remaining) AS part
          FROM ok o JOIN buckets bk ON bk.hi - bk.remaining < o.cum AND bk.hi > o.cum - o.amt
    ), per_job AS (
        SELECT o.jid, o.amt, o.ord,
               GREATEST(0, LEAST(o.cum, acct.sub_available) - (o.cum - o.amt)) AS sub_part,
               coalesce(array_agg(p.bucket_id ORDER BY p.bucket_id)
                        FILTER (WHERE p.bucket_id IS NOT NULL), '{}') AS bids,
               coalesce(array_agg(p.part ORDER BY p.bucket_id)
                        FILTER (WHERE p.bucket_id IS NOT NULL), '{}') AS bparts,
               coalesce(array_agg(-p.part ORDER BY p.bucket_id)
                        FILTER (WHERE p.bucket_id IS NOT NULL), '{}') AS bnegs,
               coalesce(sum(p.part), 0)::bigint AS from_buckets
          FROM ok o LEFT JOIN parts p ON p.ord = o.ord
         GROUP BY o.jid, o.amt, o.ord, o.cum
    ), bucket_upd AS (
        UPDATE credit_buckets b SET remaining = b.remaining - s.taken
          FROM (SELECT p.bucket_id, sum(p.part)::bigint AS taken
                  FROM parts p GROUP BY p.bucket_id) s
         WHERE b.id = s.bucket_id
    ), ins_res AS (
        INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq,
                                  bucket_ids, bucket_parts)
        SELECT j.jid, p_account, j.amt, j.sub_part, acct.period_seq, j.bids, j.bparts
          FROM per_job j ORDER BY j.jid
    ), ins_led AS (
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta,
                            reserved_delta, bucket_ids, bucket_deltas, amount, job_id)
        SELECT p_account, 'reserve', 'reserve:' || j.jid, -j.sub_part, -j.from_buckets,
               j.amt, j.bids, j.bnegs, j.amt, j.jid
          FROM per_job j ORDER BY j.ord
    ), acc_upd AS (
        UPDATE accounts a
           SET sub_available = a.sub_available - t.sub_total,
               purchased_available = a.purchased_available - t.bucket_total,
               reserved = a.reserved + t.total
          FROM (SELECT sum(j.sub_part)::bigint AS sub_total,
                       sum(j.from_buckets)::bigint AS bucket_total,
                       sum(j.amt)::bigint AS total
                  FROM per_job j) t
         WHERE a.id = p_account AND t.total > 0
           -- purchased_available promised credits the buckets do not hold: never a silent
           -- partial take (0001 raised in credits_take for the same reason).
           AND ledger_check(t.sub_total + t.bucket_total = t.total,
                            'credits_take: insufficient credits for ' || p_account)
    )
    SELECT i.jid,
           (CASE WHEN p.ord IS NOT NULL THEN
                     CASE WHEN p.acc = p_account THEN 'existing' ELSE 'conflict' END
                 WHEN o.ord IS NULL THEN 'insufficient'
                 WHEN o.ord = i.ord THEN 'reserved'
                 ELSE 'existing' END)::text,
           coalesce(p.amt, o.amt, i.amt),
           avail - (sum(CASE WHEN o.ord = i.ord THEN o.amt ELSE 0 END)
                        OVER (ORDER BY i.ord))::bigint
      FROM input i
      JOIN firsts f ON f.jid = i.jid
      LEFT JOIN prior p ON p.ord = f.ord
      LEFT JOIN ok o ON o.ord = f.ord
     ORDER BY i.ord;
END $$;
