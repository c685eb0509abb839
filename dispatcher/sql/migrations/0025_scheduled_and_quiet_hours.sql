-- Scheduled sends and quiet hours (issue 16, parts 2 and 4).
--
-- A job that may not go yet is a jobs row `scheduled` (its send_at) or `deferred` (the
-- recipient's quiet hours) with `not_before` = when it may go (migration 0022). Nothing is
-- reserved while it waits: release_due_jobs reserves it at its time, like begin_job (held and
-- the account paused when short). A scheduled broadcast is a broadcasts row `scheduled` with
-- `send_at`; it becomes `running` at its time and the runner reserves batch by batch.
--
-- One existing function is redefined, by one condition: expire_held_by_kind (0013), whose hold
-- age of a released job counts from its not_before. Every other function below is new; the old
-- ones (begin_job, cancel_broadcast, begin_broadcast_batch, reserve_batch, emit_job_event,
-- pause_account) are only called.

ALTER TABLE accounts ADD COLUMN quiet_hours_start time,
                     ADD COLUMN quiet_hours_end time,
                     ADD CONSTRAINT accounts_quiet_hours_check CHECK (
                         (quiet_hours_start IS NULL AND quiet_hours_end IS NULL)
                         OR quiet_hours_start <> quiet_hours_end);

ALTER TABLE broadcasts ADD COLUMN send_at timestamptz;
ALTER TABLE broadcasts DROP CONSTRAINT broadcasts_status_check;
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_status_check
    CHECK (status IN ('scheduled', 'running', 'completed', 'canceled'));

CREATE INDEX jobs_waiting ON jobs (not_before) WHERE status IN ('scheduled', 'deferred');
CREATE INDEX broadcasts_scheduled ON broadcasts (send_at) WHERE status = 'scheduled';

-- AMQP `cancel` jobs seen, by id: the same id again is a duplicate (same target) or a
-- conflict (another account or target), like every other job id.
CREATE TABLE cancel_requests (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    target      text NOT NULL,
    outcome     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cancel_requests_target ON cancel_requests (target, account_id);


-- Store a job that waits for its time (`scheduled` or `deferred`), nothing reserved; the same
-- answers as begin_job for an id already known (duplicate, or conflict with other content).
-- A cancel that arrived first (its target then unknown: the cancel came off the transactional
-- queue before the job off the bulk one) ends it at once: stored `canceled`, 'canceled'.
CREATE FUNCTION wait_job(
    p_job_id text, p_account text, p_kind text, p_priority text, p_payload jsonb,
    p_estimate bigint, p_country text, p_units integer, p_rate bigint, p_status text,
    p_not_before timestamptz, p_reason text
) RETURNS TABLE (outcome text, status text, attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    existing jobs%ROWTYPE;
    candidate jobs%ROWTYPE;
BEGIN
    IF p_status NOT IN ('scheduled', 'deferred') THEN
        RAISE EXCEPTION 'wait_job: status must be scheduled or deferred, got %', p_status;
    END IF;
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, NULL::text, 0;
        RETURN;
    END IF;
    SELECT * INTO existing FROM jobs j WHERE j.job_id = p_job_id FOR UPDATE;
    IF FOUND THEN
        IF existing.account_id <> p_account
           OR existing.payload - 'created_at' IS DISTINCT FROM p_payload - 'created_at' THEN
            RETURN QUERY SELECT 'conflict'::text, existing.status, existing.attempts;
        ELSE
            RETURN QUERY SELECT 'duplicate'::text, existing.status, existing.attempts;
        END IF;
        RETURN;
    END IF;
    candidate.job_id := p_job_id;
    candidate.account_id := p_account;
    candidate.kind := p_kind;
    candidate.priority := p_priority;
    candidate.status := p_status;
    candidate.payload := p_payload;
    candidate.estimate := p_estimate;
    candidate.country := p_country;
    candidate.units := p_units;
    candidate.rate := p_rate;
    candidate.attempts := 0;
    candidate.created_at := now();
    candidate.updated_at := now();
    candidate.not_before := p_not_before;
    candidate.expires_at := (p_payload ->> 'expires_at')::timestamptz;
    IF EXISTS (SELECT 1 FROM cancel_requests c
                WHERE c.target = p_job_id AND c.account_id = p_account
                  AND c.outcome = 'unknown') THEN
        candidate.status := 'canceled';
        candidate.reason := 'canceled_by_request';
        candidate.final_cost := 0;
        INSERT INTO jobs SELECT candidate.*;
        PERFORM emit_job_event(candidate, 'canceled', 'canceled_by_request');
        RETURN QUERY SELECT 'canceled'::text, 'canceled'::text, 0;
        RETURN;
    END IF;
    INSERT INTO jobs SELECT candidate.*;
    PERFORM emit_job_event(candidate, p_status, p_reason);
    RETURN QUERY SELECT p_status, p_status, 0;
END $$;


-- Release waiting jobs due at p_now (never an expired one: the expiry sweep ends those), up to
-- p_limit, the earliest first: each is reserved (`sending`, 'released') or, when its account
-- is paused or short, held in arrival order of the hold ('held', the account paused). Account
-- rows are locked in account order, then each job's status is read again under the lock, so
-- two releasers racing for the same job release it once: the second finds it moved on.
CREATE FUNCTION release_due_jobs(p_now timestamptz, p_limit integer)
RETURNS TABLE (job_id text, payload jsonb, kind text, attempts integer, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    acct accounts%ROWTYPE;
    j jobs%ROWTYPE;
    reserved text;
BEGIN
    FOR c IN SELECT d.job_id, d.account_id
               FROM (SELECT w.job_id, w.account_id, w.not_before FROM jobs w
                      WHERE w.status IN ('scheduled', 'deferred') AND w.not_before <= p_now
                        AND (w.expires_at IS NULL OR w.expires_at > p_now)
                      ORDER BY w.not_before LIMIT p_limit) d
              ORDER BY d.account_id, d.not_before, d.job_id LOOP
        SELECT * INTO acct FROM accounts a WHERE a.id = c.account_id FOR UPDATE;
        SELECT * INTO j FROM jobs x WHERE x.job_id = c.job_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND OR j.status NOT IN ('scheduled', 'deferred')
                      OR j.not_before > p_now OR j.expires_at <= p_now;
        reserved := 'insufficient';
        -- Reserved behind the account's spend guards (0023), like any job that begins now.
        IF acct.paused_at IS NULL OR guard_transactional_passes(acct.id, j.priority) THEN
            SELECT r.status INTO reserved
              FROM reserve_guarded(acct.id, ARRAY[j.priority], ARRAY[j.job_id],
                                   ARRAY[j.estimate], ARRAY[j.country]) r;
        END IF;
        IF reserved IN ('daily_cap', 'velocity') THEN
            UPDATE jobs x SET status = 'held', hold_seq = nextval('job_hold_seq'),
                              reason = reserved, updated_at = now()
             WHERE x.job_id = j.job_id
            RETURNING * INTO j;
            PERFORM emit_job_event(j, 'held', reserved);
            RETURN QUERY SELECT j.job_id, j.payload, j.kind, 0, 'held'::text;
        ELSIF reserved IN ('country_not_allowed', 'price_above_limit') THEN
            -- The guards changed while it waited: refused now, nothing reserved or charged.
            UPDATE jobs x SET status = 'failed', reason = reserved, final_cost = 0,
                              updated_at = now()
             WHERE x.job_id = j.job_id
            RETURNING * INTO j;
            PERFORM emit_job_event(j, 'failed', reserved);
            RETURN QUERY SELECT j.job_id, j.payload, j.kind, 0, 'failed'::text;
        ELSIF reserved IN ('reserved', 'existing') THEN
            UPDATE jobs x SET status = 'sending', attempts = 1, updated_at = now(),
                              sending_at = now()
             WHERE x.job_id = j.job_id;
            RETURN QUERY SELECT j.job_id, j.payload, j.kind, 1, 'released'::text;
        ELSIF reserved = 'insufficient' THEN
            UPDATE jobs x SET status = 'held', hold_seq = nextval('job_hold_seq'),
                              updated_at = now()
             WHERE x.job_id = j.job_id
            RETURNING * INTO j;
            PERFORM emit_job_event(j, 'held', 'insufficient_credits');
            IF acct.paused_at IS NULL THEN
                PERFORM pause_account(acct.id);
            END IF;
            RETURN QUERY SELECT j.job_id, j.payload, j.kind, 0, 'held'::text;
        ELSE
            -- A reservation of another account under this id: it can never be sent.
            UPDATE jobs x SET status = 'failed', reason = 'job_id_conflict', final_cost = 0,
                              updated_at = now()
             WHERE x.job_id = j.job_id
            RETURNING * INTO j;
            PERFORM emit_job_event(j, 'failed', 'job_id_conflict');
            RETURN QUERY SELECT j.job_id, j.payload, j.kind, 0, 'failed'::text;
        END IF;
    END LOOP;
END $$;


-- End one waiting job (`scheduled` or `deferred`): nothing was reserved, nothing is charged.
-- The caller holds the account lock.
CREATE FUNCTION cancel_waiting_job(p_job_id text, p_reason text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    UPDATE jobs SET status = 'canceled', reason = p_reason, final_cost = 0, updated_at = now()
     WHERE job_id = p_job_id AND status IN ('scheduled', 'deferred')
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
    END IF;
    PERFORM emit_job_event(j, 'canceled', p_reason);
    RETURN 'canceled';
END $$;


-- cancel_broadcast for a broadcast in any state: a `scheduled` one is canceled like a running
-- one (made `running` inside this transaction, so nobody ever sees it running), and its
-- recipients waiting for quiet hours to end (`deferred` jobs) end canceled too.
CREATE FUNCTION cancel_broadcast_anytime(p_broadcast text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_status text;
    j record;
BEGIN
    SELECT account_id INTO v_account FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    PERFORM 1 FROM accounts WHERE id = v_account FOR UPDATE;
    UPDATE broadcasts SET status = 'running' WHERE id = p_broadcast AND status = 'scheduled';
    v_status := cancel_broadcast(p_broadcast);
    IF v_status = 'canceled' THEN
        FOR j IN SELECT x.job_id FROM jobs x
                  WHERE x.broadcast_id = p_broadcast AND x.status IN ('scheduled', 'deferred')
                  ORDER BY x.job_id
                    FOR UPDATE LOOP
            PERFORM cancel_waiting_job(j.job_id, 'broadcast_canceled');
        END LOOP;
    END IF;
    RETURN v_status;
END $$;


-- A cancel request (API or AMQP `cancel` job) for p_target of p_account: a waiting job ends
-- `canceled`; a broadcast is canceled (cancel_broadcast_anytime). Answers 'canceled', the
-- target's status when it is past waiting (nothing done), or 'unknown' (not this account's).
CREATE FUNCTION cancel_target(p_account text, p_target text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    SELECT * INTO j FROM jobs WHERE job_id = p_target AND account_id = p_account FOR UPDATE;
    IF FOUND THEN
        IF j.status IN ('scheduled', 'deferred') THEN
            RETURN cancel_waiting_job(p_target, 'canceled_by_request');
        END IF;
        RETURN j.status;
    END IF;
    IF EXISTS (SELECT 1 FROM broadcasts WHERE id = p_target AND account_id = p_account) THEN
        RETURN cancel_broadcast_anytime(p_target);
    END IF;
    RETURN 'unknown';
END $$;


-- An AMQP `cancel` job: once per id. 'duplicate' (same id, same account and target: nothing
-- done again), 'conflict' (the id is another request's), else what cancel_target answered.
CREATE FUNCTION cancel_request(p_id text, p_account text, p_target text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    prior cancel_requests%ROWTYPE;
    v_outcome text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM accounts WHERE id = p_account) THEN
        RETURN 'unknown_account';
    END IF;
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    SELECT * INTO prior FROM cancel_requests WHERE id = p_id FOR UPDATE;
    IF FOUND THEN
        IF prior.account_id <> p_account OR prior.target <> p_target THEN
            RETURN 'conflict';
        END IF;
        RETURN 'duplicate';
    END IF;
    v_outcome := cancel_target(p_account, p_target);
    INSERT INTO cancel_requests (id, account_id, target, outcome)
    VALUES (p_id, p_account, p_target, v_outcome);
    RETURN v_outcome;
END $$;


-- The recipients of a running broadcast batch whose local time is inside the account's quiet
-- hours: claimed like begin_broadcast_batch claims them (pending -> queued), stored as
-- `deferred` jobs until p_not_befores (nothing reserved), each with a `deferred` event.
-- Returns the job ids stored. The broadcast's `deferred` figure is counted from these rows.
CREATE FUNCTION defer_broadcast_batch(
    p_broadcast text, p_seqs integer[], p_job_ids text[], p_payloads jsonb[],
    p_estimates bigint[], p_countries text[], p_units integer[], p_rates bigint[],
    p_not_befores timestamptz[]
) RETURNS TABLE (job_id text)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    live integer[];
    stored text[];
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;  -- after the lock: sees a cancel
    IF b.status <> 'running' THEN
        RETURN;
    END IF;
    WITH claimed AS (
        UPDATE broadcast_recipients SET status = 'queued'
         WHERE broadcast_id = p_broadcast AND seq = ANY(p_seqs) AND status = 'pending'
        RETURNING seq)
    SELECT coalesce(array_agg(seq), '{}') INTO live FROM claimed;
    IF cardinality(live) = 0 THEN
        RETURN;
    END IF;
    WITH inserted AS (
        INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,
                          country, units, rate, broadcast_id, attempts, not_before, expires_at)
        SELECT u.job_id, b.account_id, 'sms', b.priority, 'deferred', u.payload, u.estimate,
               u.country, u.units, u.rate, p_broadcast, 0, u.not_before,
               (u.payload ->> 'expires_at')::timestamptz
          FROM unnest(p_seqs, p_job_ids, p_payloads, p_estimates, p_countries, p_units,
                      p_rates, p_not_befores)
               WITH ORDINALITY AS u(seq, job_id, payload, estimate, country, units, rate,
                                    not_before, ord)
         WHERE u.seq = ANY(live)
         ORDER BY u.ord
        ON CONFLICT DO NOTHING
        RETURNING jobs.job_id)
    SELECT coalesce(array_agg(i.job_id ORDER BY i.job_id), '{}') INTO stored FROM inserted i;
    PERFORM emit_job_event(j, 'deferred', 'quiet_hours')
       FROM jobs j WHERE j.job_id = ANY(stored) ORDER BY j.job_id;
    UPDATE broadcast_counts SET pending = pending - cardinality(live)
     WHERE broadcast_id = p_broadcast;
    RETURN QUERY SELECT x FROM unnest(stored) AS x;
END $$;


-- As in 0013, but a job's hold age counts from when it could first go: coalesce(not_before,
-- created_at). A job scheduled days ahead and held at its release must not expire at once for
-- being created long ago. (The only change: that one condition.)
CREATE OR REPLACE FUNCTION expire_held_by_kind(p_before timestamptz, p_limit integer)
RETURNS TABLE (kind text, expired integer)
LANGUAGE plpgsql AS $$
DECLARE
    h record;
    kinds text[] := '{}';
BEGIN
    FOR h IN SELECT j.job_id, j.account_id, j.kind FROM jobs j
              WHERE j.status = 'held' AND coalesce(j.not_before, j.created_at) < p_before
              ORDER BY j.hold_seq LIMIT p_limit LOOP
        PERFORM 1 FROM accounts a WHERE a.id = h.account_id FOR UPDATE;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = h.job_id
                                                          AND j.status = 'held');
        PERFORM job_not_sent(h.job_id, 'failed', 'insufficient_credits', NULL);
        kinds := kinds || h.kind;
    END LOOP;
    RETURN QUERY SELECT k, count(*)::integer FROM unnest(kinds) AS k GROUP BY k;
END $$;
