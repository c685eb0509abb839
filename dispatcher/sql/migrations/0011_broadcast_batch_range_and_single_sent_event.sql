-- Two fixes found by bench/broadcast.py (issue 5).
--
-- 1. begin_broadcast_batch claimed its recipients with `seq = ANY(p_seqs)` as a filter over
--    every entry of the broadcast in broadcast_recipients_pending (a bitmap scan, which never
--    marks dead entries): entries of recipients already queued stay in that index until a
--    vacuum, so each batch read all the earlier ones — O(recipients so far) per batch. The
--    claim is now bounded to the batch's seq range, an index range either index can serve.
-- 2. A status event is written only when the job's status moves forward: job_accepted wrote
--    `sent` again when a `sent` callback had got there first, and job_provider_status wrote
--    its status again when a settling report repeated it (e.g. a job `sent` then settled by a
--    `sent` report). Each status event is now written once per job.

CREATE OR REPLACE FUNCTION begin_broadcast_batch(
    p_broadcast text, p_seqs integer[], p_job_ids text[], p_payloads jsonb[],
    p_estimates bigint[], p_countries text[], p_units integer[], p_rates bigint[]
) RETURNS TABLE (job_id text)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    acct accounts%ROWTYPE;
    lo integer;
    hi integer;
    live integer[];
    ids text[];
    estimates bigint[];
    reserved text[] := '{}';
    short boolean := false;
    new_sending bigint;
    new_held bigint;
    new_reserved bigint;
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;  -- after the lock: sees a cancel
    IF b.status <> 'running' THEN
        RETURN;
    END IF;
    SELECT min(s), max(s) INTO lo, hi FROM unnest(p_seqs) AS s;
    WITH claimed AS (
        UPDATE broadcast_recipients SET status = 'queued'
         WHERE broadcast_id = p_broadcast AND seq BETWEEN lo AND hi AND seq = ANY(p_seqs)
           AND status = 'pending'
        RETURNING seq)
    SELECT coalesce(array_agg(seq), '{}') INTO live FROM claimed;
    SELECT array_agg(u.job_id ORDER BY u.ord), array_agg(u.estimate ORDER BY u.ord)
      INTO ids, estimates
      FROM unnest(p_seqs, p_job_ids, p_estimates) WITH ORDINALITY AS u(seq, job_id, estimate, ord)
     WHERE u.seq = ANY(live);
    IF ids IS NULL THEN
        RETURN;
    END IF;
    IF acct.paused_at IS NULL THEN
        SELECT coalesce(array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'), '{}'),
               coalesce(bool_or(r.status = 'insufficient'), false)
          INTO reserved, short
          FROM reserve_batch(b.account_id, ids, estimates) r;
    ELSE
        short := true;
    END IF;
    WITH inserted AS (
        INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,
                          country, units, rate, broadcast_id, hold_seq, attempts, sending_at)
        SELECT u.job_id, b.account_id, 'sms', b.priority,
               CASE WHEN u.job_id = ANY(reserved) THEN 'sending' ELSE 'held' END,
               u.payload, u.estimate, u.country, u.units, u.rate, p_broadcast,
               CASE WHEN u.job_id = ANY(reserved) THEN NULL ELSE nextval('job_hold_seq') END,
               CASE WHEN u.job_id = ANY(reserved) THEN 1 ELSE 0 END,
               CASE WHEN u.job_id = ANY(reserved) THEN now() END
          FROM unnest(p_seqs, p_job_ids, p_payloads, p_estimates, p_countries, p_units,
                      p_rates)
               WITH ORDINALITY AS u(seq, job_id, payload, estimate, country, units, rate, ord)
         WHERE u.seq = ANY(live)
         ORDER BY u.ord
        ON CONFLICT DO NOTHING
        RETURNING status, estimate)
    SELECT count(*) FILTER (WHERE i.status = 'sending'), count(*) FILTER (WHERE i.status = 'held'),
           coalesce(sum(i.estimate) FILTER (WHERE i.status = 'sending'), 0)
      INTO new_sending, new_held, new_reserved
      FROM inserted i;
    IF short THEN
        PERFORM pause_account(b.account_id);
    END IF;
    -- The jobs of a broadcast are inserted here only, and counted here (the trigger on jobs
    -- counts their later changes): one update of the counts row per batch.
    UPDATE broadcast_counts
       SET pending = pending - cardinality(live), sending = sending + new_sending,
           held = held + new_held, credits_reserved = credits_reserved + new_reserved
     WHERE broadcast_id = p_broadcast;
    RETURN QUERY SELECT x FROM unnest(reserved) AS x;
END $$;


-- Record the provider's acceptance of a create; `sent` is emitted only by the move to it.
-- Under READ COMMITTED the first update re-checks its condition on a row a concurrent
-- callback just moved, so exactly one of the two writes the event.
CREATE OR REPLACE FUNCTION job_accepted(p_job_id text, p_sid text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    UPDATE jobs SET provider_sid = coalesce(provider_sid, p_sid), status = 'sent',
                    sent_at = coalesce(sent_at, now()), updated_at = now()
     WHERE job_id = p_job_id AND job_status_rank(status) < 4
    RETURNING * INTO j;
    IF FOUND THEN
        PERFORM emit_job_event(j, 'sent', NULL);
        RETURN 'sent';
    END IF;
    UPDATE jobs SET provider_sid = coalesce(provider_sid, p_sid),
                    sent_at = coalesce(sent_at, now()), updated_at = now()
     WHERE job_id = p_job_id
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN 'unknown_job';
    END IF;
    RETURN j.status;
END $$;


-- As in 0002, but the event is written only when the status moved.
CREATE OR REPLACE FUNCTION job_provider_status(p_job_id text, p_sid text, p_status text,
                                               p_cost bigint, p_error_code integer,
                                               p_settle boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    acct_id text;
    was text;
    settled text;
BEGIN
    SELECT account_id INTO acct_id FROM jobs WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN 'unknown_job';
    END IF;
    PERFORM 1 FROM accounts WHERE id = acct_id FOR UPDATE;
    SELECT * INTO j FROM jobs WHERE job_id = p_job_id FOR UPDATE;
    IF j.provider_sid IS NOT NULL AND p_sid IS NOT NULL AND j.provider_sid <> p_sid THEN
        RETURN 'sid_mismatch';
    END IF;
    IF job_status_rank(p_status) <= job_status_rank(j.status)
       AND NOT (p_settle AND j.final_cost IS NULL AND job_status_rank(j.status) >= 4) THEN
        RETURN 'ignored';
    END IF;
    was := j.status;
    IF p_settle AND j.final_cost IS NULL AND j.status NOT IN ('held', 'expired', 'canceled') THEN
        IF p_status = 'failed' THEN
            SELECT status INTO settled FROM settle_reservation(p_job_id, NULL);
            p_cost := 0;
        ELSE
            SELECT status INTO settled FROM settle_reservation(p_job_id, p_cost);
        END IF;
    END IF;
    UPDATE jobs
       SET provider_sid = coalesce(provider_sid, p_sid),
           status = CASE WHEN job_status_rank(p_status) > job_status_rank(status)
                         THEN p_status ELSE status END,
           provider_status = p_status,
           error_code = coalesce(p_error_code, error_code),
           final_cost = CASE WHEN p_settle AND final_cost IS NULL THEN p_cost ELSE final_cost END,
           sent_at = CASE WHEN p_status <> 'failed' THEN coalesce(sent_at, now()) END,
           updated_at = now()
     WHERE job_id = p_job_id
    RETURNING * INTO j;
    IF j.status <> was THEN
        PERFORM emit_job_event(j, j.status,
                               CASE WHEN p_error_code IS NOT NULL THEN 'provider_error_' || p_error_code END);
    END IF;
    RETURN j.status;
END $$;


-- 3. Progress counted every job of the broadcast on each poll, O(recipients) per poll. Its
--    counts are now kept per broadcast, moved in the transactions that change them:
--    recipients and new jobs by begin_broadcast_batch and cancel_broadcast, later job changes
--    by a trigger. The trigger is deferred to commit so that the counts row is locked after
--    every job row a transaction locks (callbacks and create answers of one broadcast lock
--    its jobs in any order); broadcast_recount is what the counts must always equal.
CREATE TABLE broadcast_counts (
    broadcast_id         text PRIMARY KEY REFERENCES broadcasts (id),
    pending              bigint NOT NULL DEFAULT 0,
    recipients_canceled  bigint NOT NULL DEFAULT 0,
    sending              bigint NOT NULL DEFAULT 0,
    sent                 bigint NOT NULL DEFAULT 0,
    delivered            bigint NOT NULL DEFAULT 0,
    failed               bigint NOT NULL DEFAULT 0,
    held                 bigint NOT NULL DEFAULT 0,
    canceled             bigint NOT NULL DEFAULT 0,
    credits_reserved     bigint NOT NULL DEFAULT 0,
    credits_spent        bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION broadcast_recount(p_broadcast text) RETURNS broadcast_counts
LANGUAGE sql STABLE AS $$
    SELECT p_broadcast,
           (SELECT count(*) FROM broadcast_recipients
             WHERE broadcast_id = p_broadcast AND status = 'pending'),
           (SELECT count(*) FROM broadcast_recipients
             WHERE broadcast_id = p_broadcast AND status = 'canceled'),
           count(*) FILTER (WHERE status IN ('sending', 'retry_wait', 'unknown')),
           count(*) FILTER (WHERE status = 'sent'),
           count(*) FILTER (WHERE status = 'delivered'),
           count(*) FILTER (WHERE status IN ('failed', 'undelivered', 'expired')),
           count(*) FILTER (WHERE status = 'held'),
           count(*) FILTER (WHERE status = 'canceled'),
           coalesce(sum(estimate) FILTER (WHERE status IN ('sending', 'retry_wait', 'unknown',
                                                           'sent')
                                            AND final_cost IS NULL), 0)::bigint,
           coalesce(sum(final_cost), 0)::bigint
      FROM jobs WHERE broadcast_id = p_broadcast
$$;

INSERT INTO broadcast_counts SELECT c.* FROM broadcasts b, LATERAL broadcast_recount(b.id) c;

CREATE FUNCTION jobs_count_for_broadcast() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    o jobs := OLD;
BEGIN
    UPDATE broadcast_counts SET
        sending = sending + (NEW.status IN ('sending', 'retry_wait', 'unknown'))::int
                  - coalesce((o.status IN ('sending', 'retry_wait', 'unknown'))::int, 0),
        sent = sent + (NEW.status = 'sent')::int - coalesce((o.status = 'sent')::int, 0),
        delivered = delivered + (NEW.status = 'delivered')::int
                    - coalesce((o.status = 'delivered')::int, 0),
        failed = failed + (NEW.status IN ('failed', 'undelivered', 'expired'))::int
                 - coalesce((o.status IN ('failed', 'undelivered', 'expired'))::int, 0),
        held = held + (NEW.status = 'held')::int - coalesce((o.status = 'held')::int, 0),
        canceled = canceled + (NEW.status = 'canceled')::int
                   - coalesce((o.status = 'canceled')::int, 0),
        credits_reserved = credits_reserved
            + CASE WHEN NEW.status IN ('sending', 'retry_wait', 'unknown', 'sent')
                        AND NEW.final_cost IS NULL THEN NEW.estimate ELSE 0 END
            - CASE WHEN o.status IN ('sending', 'retry_wait', 'unknown', 'sent')
                        AND o.final_cost IS NULL THEN o.estimate ELSE 0 END,
        credits_spent = credits_spent + coalesce(NEW.final_cost, 0) - coalesce(o.final_cost, 0)
     WHERE broadcast_id = NEW.broadcast_id;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER jobs_counted_updated AFTER UPDATE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.broadcast_id IS NOT NULL
          AND (OLD.status IS DISTINCT FROM NEW.status
               OR OLD.estimate IS DISTINCT FROM NEW.estimate
               OR OLD.final_cost IS DISTINCT FROM NEW.final_cost))
    EXECUTE FUNCTION jobs_count_for_broadcast();


-- As in 0005, with the recipients it drops counted; the counts row is updated last.
CREATE OR REPLACE FUNCTION cancel_broadcast(p_broadcast text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    j record;
    dropped bigint;
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    PERFORM 1 FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF b.status <> 'running' THEN
        RETURN b.status;
    END IF;
    UPDATE broadcasts SET status = 'canceled', finished_at = now() WHERE id = p_broadcast;
    WITH c AS (
        UPDATE broadcast_recipients SET status = 'canceled'
         WHERE broadcast_id = p_broadcast AND status = 'pending'
        RETURNING 1)
    SELECT count(*) INTO dropped FROM c;
    FOR j IN SELECT job_id FROM jobs WHERE broadcast_id = p_broadcast AND status = 'held' LOOP
        PERFORM job_not_sent(j.job_id, 'canceled', 'broadcast_canceled', NULL);
    END LOOP;
    UPDATE broadcast_counts
       SET pending = pending - dropped, recipients_canceled = recipients_canceled + dropped
     WHERE broadcast_id = p_broadcast;
    RETURN 'canceled';
END $$;


-- 4. reserve_batch (0006) as it was, but for its lookup of the batch's job ids in
--    reservations. With force_generic_plan its plan is made once per connection; made while
--    reservations was small (a fresh database, no ANALYZE yet) it hashed a seq scan of the
--    whole table, and kept doing so as the table grew: O(reservations) per batch. A LATERAL
--    subquery kept apart (OFFSET 0) is an index probe per job id whatever the table's size.
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
          LEFT JOIN LATERAL (SELECT * FROM reservations x WHERE x.job_id = u.jid OFFSET 0) r
            ON true
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
