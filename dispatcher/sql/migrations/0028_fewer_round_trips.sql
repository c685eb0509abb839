-- Issue 15: a one-job reservation without the set-based statement.
--
-- begin_job reserves one job at a time (reserve_batch(account, ARRAY[job], ARRAY[amount])), and
-- so does CreditStore.reserve. For one job, 0011's set-based statement (window functions over
-- the batch, four data-modifying CTEs, a generic plan) was ~3/4 of begin_job's time and the
-- largest PostgreSQL cost per job (pg_stat_user_functions, bench.pipeline_peer --db-stats).
-- reserve_one does the same for a single job with plain statements: the same answer, the same
-- rows written (the subscription first, then buckets oldest first; tests/integration/
-- test_reserve_one.py compares it with 0001's reserve_batch and 0011's on random accounts).
--
-- Merge note: reserve_batch's body is NOT rewritten. It is renamed reserve_batch_set, and a
-- small reserve_batch in front sends one-job calls to reserve_one and the rest to it. A later
-- migration that replaces reserve_batch with a full body simply drops the fast path; one that
-- replaces reserve_batch_set keeps it.

ALTER FUNCTION reserve_batch(text, text[], bigint[]) RENAME TO reserve_batch_set;

CREATE FUNCTION reserve_one(p_account text, p_job_id text, p_amount bigint)
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    prior reservations%ROWTYPE;
    avail bigint;
    v_sub bigint;
    v_need bigint;
    v_part bigint;
    v_bids bigint[] := '{}';
    v_bparts bigint[] := '{}';
    v_bnegs bigint[] := '{}';
    bk record;
BEGIN
    SELECT * INTO acct FROM accounts a WHERE a.id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT p_job_id, 'unknown_account'::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'reserve_batch: amount must be positive, got %', p_amount;
    END IF;
    avail := acct.sub_available + acct.purchased_available - acct.debt;
    SELECT * INTO prior FROM reservations r WHERE r.job_id = p_job_id;
    IF FOUND THEN
        RETURN QUERY SELECT p_job_id,
                            CASE WHEN prior.account_id = p_account THEN 'existing'
                                 ELSE 'conflict' END::text,
                            prior.amount, avail;
        RETURN;
    END IF;
    IF p_amount > avail THEN
        RETURN QUERY SELECT p_job_id, 'insufficient'::text, p_amount, avail;
        RETURN;
    END IF;
    -- The subscription first, then the buckets oldest first (sub_available >= 0).
    v_sub := LEAST(p_amount, acct.sub_available);
    v_need := p_amount - v_sub;
    IF v_need > 0 THEN
        FOR bk IN SELECT b.id, b.remaining FROM credit_buckets b
                   WHERE b.account_id = p_account AND b.remaining > 0 ORDER BY b.id LOOP
            v_part := LEAST(v_need, bk.remaining);
            v_bids := v_bids || bk.id;
            v_bparts := v_bparts || v_part;
            v_bnegs := v_bnegs || -v_part;
            UPDATE credit_buckets b SET remaining = b.remaining - v_part WHERE b.id = bk.id;
            v_need := v_need - v_part;
            EXIT WHEN v_need = 0;
        END LOOP;
    END IF;
    -- purchased_available promised credits the buckets do not hold: never a silent partial
    -- take (the same check, and message, as reserve_batch_set's).
    PERFORM ledger_check(v_need = 0, 'credits_take: insufficient credits for ' || p_account);
    INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq, bucket_ids,
                              bucket_parts)
    VALUES (p_job_id, p_account, p_amount, v_sub, acct.period_seq, v_bids, v_bparts);
    INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, reserved_delta,
                        bucket_ids, bucket_deltas, amount, job_id)
    VALUES (p_account, 'reserve', 'reserve:' || p_job_id, -v_sub, -(p_amount - v_sub),
            p_amount, v_bids, v_bnegs, p_amount, p_job_id);
    UPDATE accounts a
       SET sub_available = a.sub_available - v_sub,
           purchased_available = a.purchased_available - (p_amount - v_sub),
           reserved = a.reserved + p_amount
     WHERE a.id = p_account;
    RETURN QUERY SELECT p_job_id, 'reserved'::text, p_amount, avail - p_amount;
END $$;

CREATE FUNCTION reserve_batch(p_account text, p_job_ids text[], p_amounts bigint[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_job_ids) = 1 AND cardinality(p_amounts) = 1 THEN
        RETURN QUERY SELECT * FROM reserve_one(p_account, p_job_ids[array_lower(p_job_ids, 1)],
                                               p_amounts[array_lower(p_amounts, 1)]);
    ELSE
        RETURN QUERY SELECT * FROM reserve_batch_set(p_account, p_job_ids, p_amounts);
    END IF;
END $$;
