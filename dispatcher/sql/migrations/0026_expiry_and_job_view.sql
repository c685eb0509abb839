-- Expiry (issue 16, part 3) and the job view (part 5).
--
-- A job may carry an `expires_at` (the contract turns `validity_seconds` into it, counted from
-- the job's created_at, else its receipt): it is never sent after that moment. Where a job can
-- still be waiting when its time passes, it ends `failed` with reason `expired`, its credits
-- released and nothing charged (the final status is `failed`, as for held jobs past the hold
-- limit; `expired` is a reason, not a status):
--   * waiting in PostgreSQL (held, scheduled, deferred, queued, retry_wait): the expiry sweep,
--     expire_jobs(), run by every replica (rows locked SKIP LOCKED under their account's lock);
--   * consumed after it: begin_expired_job() records it failed/expired without reserving;
--   * released and waiting for its sender's turn or a provider slot (`sending`): the claim
--     right before the provider call, claim_job_send(), ends it instead;
--   * pending recipients of a broadcast past its expires_at: expire_broadcast_pending().
--
-- jobs.expires_at (migration 0022) is set by a BEFORE INSERT trigger from the stored payload,
-- so every function inserting a jobs row (begin_job, hold_job, begin_broadcast_batch, and any
-- later one) gets it without being rewritten; a function that sets the column itself wins.

ALTER TABLE broadcasts ADD COLUMN expires_at timestamptz;

CREATE FUNCTION jobs_expires_from_payload() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.expires_at := coalesce(NEW.expires_at, (NEW.payload ->> 'expires_at')::timestamptz);
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_expires_at BEFORE INSERT ON jobs
    FOR EACH ROW WHEN (NEW.expires_at IS NULL AND NEW.payload ? 'expires_at')
    EXECUTE FUNCTION jobs_expires_from_payload();

-- The sweep reads only waiting jobs with a validity.
CREATE INDEX jobs_expiry_due ON jobs (expires_at)
    WHERE expires_at IS NOT NULL
      AND status IN ('held', 'scheduled', 'deferred', 'queued', 'retry_wait');

-- A job's status events, for its history (GET /v1/accounts/{account}/jobs/{job_id}).
CREATE INDEX outbox_job_events ON outbox ((body ->> 'job_id')) WHERE exchange = 'events';


-- What identifies a job's content for the same-id check: the stored payload less the
-- created_at stamp, and less an expires_at derived from validity_seconds (it is counted from
-- created_at, which the publisher helper stamps again on each publish).
CREATE FUNCTION job_content(p_payload jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_payload ? 'validity_seconds'
                THEN p_payload - 'created_at' - 'expires_at'
                ELSE p_payload - 'created_at' END
$$;


-- As in 0022, but the same-id check compares job_content() (a republished job with
-- validity_seconds is a duplicate, not a conflict). ONE LINE CHANGED, marked `0026:`.
-- With 0023's spend-guard edits (marked 0023) kept.
CREATE OR REPLACE FUNCTION begin_job(
    p_job_id text, p_account text, p_kind text, p_priority text, p_payload jsonb,
    p_estimate bigint, p_country text, p_units integer, p_rate bigint, p_broadcast_id text
) RETURNS TABLE (outcome text, status text, attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    existing jobs%ROWTYPE;
    candidate jobs%ROWTYPE;
    reserved text;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, NULL::text, 0;
        RETURN;
    END IF;
    SELECT * INTO existing FROM jobs j WHERE j.job_id = p_job_id FOR UPDATE;
    IF FOUND THEN
        IF existing.account_id <> p_account
           -- 0026: was `existing.payload - 'created_at' IS DISTINCT FROM p_payload - 'created_at'`
           OR job_content(existing.payload) IS DISTINCT FROM job_content(p_payload) THEN
            RETURN QUERY SELECT 'conflict'::text, existing.status, existing.attempts;
        ELSIF existing.status = 'retry_wait' THEN
            UPDATE jobs j SET status = 'sending', attempts = j.attempts + 1, updated_at = now(),
                              sending_at = now(), retry_at = NULL
             WHERE j.job_id = p_job_id;
            RETURN QUERY SELECT 'send'::text, 'sending'::text, existing.attempts + 1;
        ELSE
            RETURN QUERY SELECT 'duplicate'::text, existing.status, existing.attempts;
        END IF;
        RETURN;
    END IF;
    candidate.job_id := p_job_id;
    candidate.account_id := p_account;
    candidate.kind := p_kind;
    candidate.priority := p_priority;
    candidate.status := 'sending';
    candidate.payload := p_payload;
    candidate.estimate := p_estimate;
    candidate.country := p_country;
    candidate.units := p_units;
    candidate.rate := p_rate;
    candidate.broadcast_id := p_broadcast_id;
    candidate.attempts := 1;
    candidate.created_at := now();
    candidate.updated_at := now();
    candidate.sending_at := now();
    -- (expires_at: set from the payload by the jobs_expires_at trigger, migration 0026)
    IF acct.paused_at IS NOT NULL
       AND NOT guard_transactional_passes(p_account, p_priority) THEN  -- 0023
        PERFORM hold_job(candidate);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    END IF;
    SELECT r.status INTO reserved  -- 0023: reserve_guarded, was reserve_batch
      FROM reserve_guarded(p_account, ARRAY[p_priority], ARRAY[p_job_id], ARRAY[p_estimate],
                           ARRAY[p_country]) r;
    IF reserved IN ('country_not_allowed', 'price_above_limit') THEN  -- 0023
        RETURN QUERY SELECT reserved, NULL::text, 0;
        RETURN;
    ELSIF reserved IN ('daily_cap', 'velocity') THEN  -- 0023
        PERFORM guard_hold_job(candidate, reserved);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    ELSIF reserved = 'insufficient' THEN
        PERFORM hold_job(candidate);
        PERFORM pause_account(p_account);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    ELSIF reserved <> 'reserved' THEN
        -- A reservation without a job row: only a foreign job id can cause it.
        RETURN QUERY SELECT 'conflict'::text, NULL::text, 0;
        RETURN;
    END IF;
    INSERT INTO jobs SELECT candidate.*;
    RETURN QUERY SELECT 'send'::text, 'sending'::text, 1;
END $$;


-- A consumed job whose expires_at has passed: never reserved, never sent. Recorded `failed`
-- (reason expired, final cost 0) with its status event, so its id is spent like any other:
-- the same job again is a duplicate, another job under the id a conflict. A job already
-- waiting under the id (a retry_wait whose retry message came back late, a held one) ends the
-- same way, its credits released. Outcomes as begin_job's, plus 'expired'.
CREATE FUNCTION begin_expired_job(
    p_job_id text, p_account text, p_kind text, p_priority text, p_payload jsonb,
    p_estimate bigint, p_country text, p_units integer, p_rate bigint
) RETURNS TABLE (outcome text, status text, attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    existing jobs%ROWTYPE;
    ended jobs%ROWTYPE;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, NULL::text, 0;
        RETURN;
    END IF;
    SELECT * INTO existing FROM jobs j WHERE j.job_id = p_job_id FOR UPDATE;
    IF FOUND THEN
        IF existing.account_id <> p_account
           OR job_content(existing.payload) IS DISTINCT FROM job_content(p_payload) THEN
            RETURN QUERY SELECT 'conflict'::text, existing.status, existing.attempts;
        ELSIF existing.status IN ('held', 'scheduled', 'deferred', 'queued', 'retry_wait') THEN
            PERFORM job_not_sent(p_job_id, 'failed', 'expired', NULL);
            RETURN QUERY SELECT 'expired'::text, 'failed'::text, existing.attempts;
        ELSE
            RETURN QUERY SELECT 'duplicate'::text, existing.status, existing.attempts;
        END IF;
        RETURN;
    END IF;
    INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, country,
                      units, rate, attempts, reason, final_cost)
    VALUES (p_job_id, p_account, p_kind, p_priority, 'failed', p_payload, p_estimate,
            p_country, p_units, p_rate, 0, 'expired', 0)
    RETURNING * INTO ended;
    PERFORM emit_job_event(ended, 'failed', 'expired');
    RETURN QUERY SELECT 'expired'::text, 'failed'::text, 0;
END $$;


-- The expiry sweep: end up to p_limit waiting jobs whose expires_at is at or before p_now
-- (the caller's clock) `failed` with reason expired, releasing what they had reserved (a held,
-- scheduled, deferred or queued job has nothing reserved; a retry_wait one has). Account rows
-- are locked in account order, one at a time, before their jobs; each job is re-read under
-- that lock and skipped if another transaction holds it (a claim in progress) or it moved on.
-- Several replicas may sweep at once: each job ends once. Returns the jobs it ended.
CREATE FUNCTION expire_jobs(p_now timestamptz, p_limit integer)
RETURNS TABLE (expired_job_id text, expired_kind text, expired_broadcast_id text,
               was_status text)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    j jobs%ROWTYPE;
    locked text;
BEGIN
    FOR c IN SELECT x.job_id, x.account_id FROM jobs x
              WHERE x.expires_at <= p_now
                AND x.status IN ('held', 'scheduled', 'deferred', 'queued', 'retry_wait')
              ORDER BY x.account_id, x.expires_at, x.job_id
              LIMIT p_limit LOOP
        IF locked IS DISTINCT FROM c.account_id THEN
            PERFORM 1 FROM accounts a WHERE a.id = c.account_id FOR UPDATE;
            locked := c.account_id;
        END IF;
        SELECT * INTO j FROM jobs x
         WHERE x.job_id = c.job_id AND x.expires_at <= p_now
           AND x.status IN ('held', 'scheduled', 'deferred', 'queued', 'retry_wait')
           FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        PERFORM job_not_sent(j.job_id, 'failed', 'expired', NULL);
        expired_job_id := j.job_id;
        expired_kind := j.kind;
        expired_broadcast_id := j.broadcast_id;
        was_status := j.status;
        RETURN NEXT;
    END LOOP;
END $$;


-- Pending recipients of a running broadcast past its expires_at never become sendable jobs:
-- up to p_limit of them (in seq order) are recorded as jobs ended `failed`, reason expired,
-- nothing reserved, with their status events, and counted (pending -> failed). Returns how
-- many it ended; 0 when the broadcast is not running or not expired at p_now.
CREATE FUNCTION expire_broadcast_pending(p_broadcast text, p_now timestamptz, p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    claimed integer;
    ended text[];
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND OR b.expires_at IS NULL OR b.expires_at > p_now THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;  -- after the lock: sees a cancel
    IF b.status <> 'running' THEN
        RETURN 0;
    END IF;
    WITH due AS (
        UPDATE broadcast_recipients r SET status = 'queued'
         WHERE r.broadcast_id = p_broadcast AND r.status = 'pending'
           AND r.seq IN (SELECT p.seq FROM broadcast_recipients p
                          WHERE p.broadcast_id = p_broadcast AND p.status = 'pending'
                          ORDER BY p.seq LIMIT p_limit)
        RETURNING r.seq, r.to_number),
    counted AS (SELECT count(*)::integer AS n FROM due),
    inserted AS (
        INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,
                          broadcast_id, attempts, reason, final_cost, expires_at)
        SELECT p_broadcast || ':' || d.seq, b.account_id, 'sms', b.priority, 'failed',
               jsonb_build_object('schema_version', 1, 'id', p_broadcast || ':' || d.seq,
                                  'kind', 'sms', 'account', b.account_id, 'to', d.to_number,
                                  'priority', b.priority, 'metadata', b.metadata,
                                  'expires_at', to_char(b.expires_at AT TIME ZONE 'UTC',
                                                        'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
               1, p_broadcast, 0, 'expired', 0, b.expires_at
          FROM due d ORDER BY d.seq
        ON CONFLICT DO NOTHING
        RETURNING jobs.job_id)
    SELECT (SELECT n FROM counted), coalesce(array_agg(i.job_id), '{}')
      INTO claimed, ended FROM inserted i;
    IF cardinality(ended) > 0 THEN
        PERFORM emit_job_event(j, 'failed', 'expired')
           FROM jobs j WHERE j.job_id = ANY(ended) ORDER BY j.job_id;
    END IF;
    -- Jobs of a broadcast are counted by whoever inserts them (the trigger counts changes).
    UPDATE broadcast_counts
       SET pending = pending - coalesce(claimed, 0), failed = failed + cardinality(ended)
     WHERE broadcast_id = p_broadcast;
    RETURN cardinality(ended);
END $$;


-- As in 0016, plus the expiry check (marked `0026:`): a `sending` job past its expires_at is
-- not claimed; it ends failed/expired, its credits released, and 'expired' is returned.
CREATE OR REPLACE FUNCTION claim_job_send(p_job_id text, p_attempt integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    acct_id text;
    bc text;
    expiry timestamptz;
BEGIN
    SELECT account_id, broadcast_id, expires_at INTO acct_id, bc, expiry
      FROM jobs WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN 'unknown_job';
    END IF;
    IF bc IS NOT NULL
       AND EXISTS (SELECT 1 FROM broadcasts WHERE id = bc AND status = 'canceled') THEN
        PERFORM 1 FROM accounts WHERE id = acct_id FOR UPDATE;
        SELECT * INTO j FROM jobs WHERE job_id = p_job_id FOR UPDATE;
        IF j.status = 'sending' AND j.attempts = p_attempt THEN
            RETURN job_not_sent(p_job_id, 'canceled', 'broadcast_canceled', NULL);
        END IF;
        RETURN j.status;
    END IF;
    -- 0026: never sent after its expires_at.
    IF expiry <= now() THEN
        PERFORM 1 FROM accounts WHERE id = acct_id FOR UPDATE;
        SELECT * INTO j FROM jobs WHERE job_id = p_job_id FOR UPDATE;
        IF j.status = 'sending' AND j.attempts = p_attempt THEN
            PERFORM job_not_sent(p_job_id, 'failed', 'expired', NULL);
            RETURN 'expired';
        END IF;
        RETURN j.status;
    END IF;
    UPDATE jobs SET updated_at = now()
     WHERE job_id = p_job_id AND status = 'sending' AND attempts = p_attempt
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
    END IF;
    IF bc IS NOT NULL THEN
        -- Job ids of a broadcast are `<broadcast>:<seq>` (the runner makes them).
        UPDATE broadcast_recipients SET send_claimed_at = coalesce(send_claimed_at, now())
         WHERE broadcast_id = bc AND seq = substr(p_job_id, length(bc) + 2)::integer;
    END IF;
    RETURN 'claimed';
END $$;
