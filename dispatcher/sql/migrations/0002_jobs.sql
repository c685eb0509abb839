-- Jobs and their state machine, held jobs of paused accounts, and the transactional outbox.
--
-- A job row moves forward only:
--   received -> held -> sending -> retry_wait -> sending ... -> unknown -> sent -> delivered
--                                                                           \-> undelivered
--   any non-final state -> failed | expired | canceled
-- The reservation is written in the same transaction that marks the job `sending`, and the
-- provider is called at most once per `sending` episode that could have reached it.

ALTER TABLE accounts
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN low_balance_episode integer NOT NULL DEFAULT 0,
    -- True while the account is below its threshold and balance.low was already emitted.
    ADD COLUMN low_balance_open boolean NOT NULL DEFAULT false;

CREATE SEQUENCE job_hold_seq;

CREATE TABLE jobs (
    job_id         text PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (id),
    kind           text NOT NULL CHECK (kind IN ('sms', 'call')),
    priority       text NOT NULL CHECK (priority IN ('transactional', 'bulk')),
    status         text NOT NULL CHECK (status IN (
                       'held', 'sending', 'retry_wait', 'unknown', 'sent', 'delivered',
                       'undelivered', 'failed', 'expired', 'canceled')),
    payload        jsonb NOT NULL,
    estimate       bigint NOT NULL CHECK (estimate > 0),
    country        text,
    units          integer NOT NULL DEFAULT 1,   -- SMS segments, or call minutes reserved
    rate           bigint NOT NULL DEFAULT 0,    -- credits per unit at reservation time
    broadcast_id   text,
    hold_seq       bigint,
    attempts       integer NOT NULL DEFAULT 0,
    provider_sid   text UNIQUE,
    provider_status text,
    error_code     integer,
    reason         text,
    final_cost     bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    sending_at     timestamptz,
    sent_at        timestamptz
);
CREATE INDEX jobs_held ON jobs (account_id, hold_seq) WHERE status = 'held';
CREATE INDEX jobs_unresolved ON jobs (updated_at) WHERE status IN ('sending', 'unknown');
CREATE INDEX jobs_unsettled ON jobs (updated_at) WHERE status = 'sent';
CREATE INDEX jobs_broadcast ON jobs (broadcast_id, status) WHERE broadcast_id IS NOT NULL;

CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    exchange      text NOT NULL CHECK (exchange IN ('events', 'billing')),
    routing_key   text NOT NULL,
    body          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dispatcher_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_inserted AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();


CREATE FUNCTION job_status_rank(p_status text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status
        WHEN 'held' THEN 1 WHEN 'sending' THEN 2 WHEN 'retry_wait' THEN 2 WHEN 'unknown' THEN 3
        WHEN 'sent' THEN 4 ELSE 5 END
$$;


-- Write a status event (job id, status, reason, metadata echoed) to the outbox.
CREATE FUNCTION emit_job_event(p_job jobs, p_status text, p_reason text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    VALUES (gen_random_uuid(), 'events', 'job.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', gen_random_uuid(), 'job_id', p_job.job_id,
        'account', p_job.account_id, 'kind', p_job.kind, 'status', p_status,
        'reason', p_reason, 'provider_sid', p_job.provider_sid,
        'segments', CASE WHEN p_job.kind = 'sms' THEN p_job.units END,
        'credits', coalesce(p_job.final_cost, p_job.estimate),
        'metadata', coalesce(p_job.payload -> 'metadata', '{}'::jsonb),
        'broadcast_id', p_job.broadcast_id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
$$;


-- Hold a job of a paused (or just depleted) account, in arrival order.
CREATE FUNCTION hold_job(p_job jobs) RETURNS jobs LANGUAGE plpgsql AS $$
DECLARE
    held jobs;
BEGIN
    p_job.status := 'held';
    p_job.hold_seq := nextval('job_hold_seq');
    p_job.attempts := 0;
    INSERT INTO jobs SELECT p_job.* RETURNING * INTO held;
    PERFORM emit_job_event(held, 'held', 'insufficient_credits');
    RETURN held;
END $$;


-- balance.low once per episode: when available credits cross below the threshold; the episode
-- closes when credits lift the balance back to the threshold or above. Fires on every change
-- of an account's balance, whatever its cause (reservation, overage, refund, forfeit).
CREATE FUNCTION accounts_low_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    avail bigint := NEW.sub_available + NEW.purchased_available - NEW.debt;
    threshold bigint := NEW.auto_recharge_threshold;
BEGIN
    IF NEW.low_balance_open AND avail >= threshold AND avail > 0 THEN
        NEW.low_balance_open := false;
    ELSIF NOT NEW.low_balance_open
          AND (avail < threshold OR (avail <= 0 AND NEW.topup_at_zero))
          AND (NEW.auto_recharge_enabled OR (avail <= 0 AND NEW.topup_at_zero)) THEN
        NEW.low_balance_open := true;
        NEW.low_balance_episode := NEW.low_balance_episode + 1;
        INSERT INTO outbox (event_id, exchange, routing_key, body)
        SELECT e.id, 'billing', 'balance.low', jsonb_build_object(
            'schema_version', 1, 'type', 'balance.low', 'event_id', e.id,
            'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'account', NEW.id, 'available', avail, 'threshold', threshold,
            'episode', NEW.low_balance_episode,
            'auto_recharge', jsonb_build_object(
                'enabled', NEW.auto_recharge_enabled, 'threshold', threshold,
                'amount', NEW.auto_recharge_amount),
            'topup_at_zero', NEW.topup_at_zero)
          FROM (SELECT gen_random_uuid() AS id) e;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_low_balance BEFORE UPDATE ON accounts
    FOR EACH ROW
    WHEN (OLD.sub_available IS DISTINCT FROM NEW.sub_available
          OR OLD.purchased_available IS DISTINCT FROM NEW.purchased_available
          OR OLD.debt IS DISTINCT FROM NEW.debt
          OR OLD.auto_recharge_enabled IS DISTINCT FROM NEW.auto_recharge_enabled
          OR OLD.auto_recharge_threshold IS DISTINCT FROM NEW.auto_recharge_threshold)
    EXECUTE FUNCTION accounts_low_balance();


-- Pause an account (its next jobs are held) and tell billing it is depleted.
CREATE FUNCTION pause_account(p_account text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    held_count bigint;
    held_credits bigint;
BEGIN
    UPDATE accounts SET paused_at = now() WHERE id = p_account AND paused_at IS NULL
    RETURNING * INTO acct;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT count(*), coalesce(sum(estimate), 0) INTO held_count, held_credits
      FROM jobs WHERE account_id = p_account AND status = 'held';
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT e.id, 'billing', 'balance.depleted', jsonb_build_object(
        'schema_version', 1, 'type', 'balance.depleted', 'event_id', e.id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'account', p_account,
        'available', acct.sub_available + acct.purchased_available - acct.debt,
        'held_jobs', held_count, 'held_credits', held_credits,
        'episode', greatest(acct.low_balance_episode, 1),
        'auto_recharge', jsonb_build_object(
            'enabled', acct.auto_recharge_enabled, 'threshold', acct.auto_recharge_threshold,
            'amount', acct.auto_recharge_amount),
        'topup_requested_even_if_disabled',
            NOT acct.auto_recharge_enabled AND acct.topup_at_zero)
      FROM (SELECT gen_random_uuid() AS id) e;
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT e.id, 'events', 'account.paused', jsonb_build_object(
        'schema_version', 1, 'event_id', e.id, 'account', p_account, 'status', 'paused',
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
      FROM (SELECT gen_random_uuid() AS id) e;
END $$;


-- Start a job: reserve its credits and mark it `sending`, or hold it when its account is
-- paused or cannot pay, all in one transaction. Outcomes:
--   send             the caller calls the provider now (attempt counts this call)
--   held             held in arrival order; the account is paused
--   duplicate        the job id was seen before; `status` says where it is (nothing changes)
--   conflict         the job id belongs to another account
--   unknown_account
CREATE FUNCTION begin_job(
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
        IF existing.account_id <> p_account THEN
            RETURN QUERY SELECT 'conflict'::text, existing.status, existing.attempts;
        ELSIF existing.status = 'retry_wait' THEN
            UPDATE jobs j SET status = 'sending', attempts = j.attempts + 1, updated_at = now(),
                              sending_at = now()
             WHERE j.job_id = p_job_id;
            RETURN QUERY SELECT 'send'::text, 'sending'::text, existing.attempts + 1;
        ELSE
            RETURN QUERY SELECT 'duplicate'::text, existing.status, existing.attempts;
        END IF;
        RETURN;
    END IF;
    candidate := ROW(p_job_id, p_account, p_kind, p_priority, 'sending', p_payload, p_estimate,
                     p_country, p_units, p_rate, p_broadcast_id, NULL, 1, NULL, NULL, NULL,
                     NULL, NULL, now(), now(), now(), NULL)::jobs;
    IF acct.paused_at IS NOT NULL THEN
        PERFORM hold_job(candidate);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    END IF;
    SELECT r.status INTO reserved
      FROM reserve_batch(p_account, ARRAY[p_job_id], ARRAY[p_estimate]) r;
    IF reserved = 'insufficient' THEN
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


-- Record the provider's acceptance of a create (status moves forward only).
CREATE FUNCTION job_accepted(p_job_id text, p_sid text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    UPDATE jobs SET provider_sid = coalesce(provider_sid, p_sid),
                    status = CASE WHEN job_status_rank(status) < 4 THEN 'sent' ELSE status END,
                    sent_at = coalesce(sent_at, now()), updated_at = now()
     WHERE job_id = p_job_id
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN 'unknown_job';
    END IF;
    IF j.status = 'sent' THEN
        PERFORM emit_job_event(j, 'sent', NULL);
    END IF;
    RETURN j.status;
END $$;


-- End a job that was never sent: failed (or expired / canceled), its credits released.
CREATE FUNCTION job_not_sent(p_job_id text, p_status text, p_reason text, p_error_code integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    acct_id text;
BEGIN
    SELECT account_id INTO acct_id FROM jobs WHERE job_id = p_job_id;
    PERFORM 1 FROM accounts WHERE id = acct_id FOR UPDATE;
    SELECT * INTO j FROM jobs WHERE job_id = p_job_id FOR UPDATE;
    IF NOT FOUND OR job_status_rank(j.status) >= 4 THEN
        RETURN coalesce(j.status, 'unknown_job');
    END IF;
    IF j.status <> 'held' THEN
        PERFORM settle_reservation(p_job_id, NULL);
    END IF;
    UPDATE jobs SET status = p_status, reason = p_reason, error_code = p_error_code,
                    final_cost = 0, updated_at = now()
     WHERE job_id = p_job_id
    RETURNING * INTO j;
    PERFORM emit_job_event(j, p_status, p_reason);
    RETURN p_status;
END $$;


-- The create's outcome is unknown (timeout, 5xx): keep the credits, never resend by itself.
CREATE FUNCTION job_unknown(p_job_id text, p_reason text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    UPDATE jobs SET status = 'unknown', reason = p_reason, updated_at = now()
     WHERE job_id = p_job_id AND status = 'sending'
    RETURNING * INTO j;
    IF FOUND THEN
        PERFORM emit_job_event(j, 'unknown', p_reason);
        RETURN 'unknown';
    END IF;
    RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
END $$;


-- A transient refusal (429 before sending): keep the reservation, wait, try again.
CREATE FUNCTION job_retry_later(p_job_id text, p_reason text, p_error_code integer)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET status = 'retry_wait', reason = p_reason, error_code = p_error_code,
                    updated_at = now()
     WHERE job_id = p_job_id AND status = 'sending';
    RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
END $$;


-- Apply a provider status (callback or reconciliation). Binds the SID when the create answer
-- was lost, moves status forward only, and settles to the real cost once:
--   p_final_status 'delivered' | 'undelivered' | 'sent' with p_cost -> capture p_cost
--   p_final_status 'failed' -> release (the provider did not send it)
-- Returns the job's status after the change ('ignored' when nothing moved).
CREATE FUNCTION job_provider_status(p_job_id text, p_sid text, p_status text,
                                    p_cost bigint, p_error_code integer, p_settle boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    acct_id text;
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
    IF job_status_rank(p_status) > 0 AND j.status = p_status THEN
        PERFORM emit_job_event(j, p_status,
                               CASE WHEN p_error_code IS NOT NULL THEN 'provider_error_' || p_error_code END);
    END IF;
    RETURN j.status;
END $$;
