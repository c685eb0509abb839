-- Ground for the multi-tenant work (issues 16, 17): the columns and statuses several changes
-- share, added once so that each of them only has to add its own behaviour.
--
--   not_before  a job that may not be sent before this time: `scheduled` (its send_at) or
--               `deferred` (the recipient's quiet hours); nothing is reserved until then.
--   expires_at  a job that must never be sent after this time (its validity).
--   queued      a job accepted and staged in PostgreSQL, waiting for its fair turn.
--
-- begin_job builds its candidate row by column name, not by position, so a later column with
-- a default no longer forces every migration that adds one to rewrite it.

ALTER TABLE jobs ADD COLUMN not_before timestamptz,
                 ADD COLUMN expires_at timestamptz;

ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check CHECK (status IN (
    'scheduled', 'deferred', 'queued', 'held', 'sending', 'retry_wait', 'unknown', 'sent',
    'delivered', 'undelivered', 'failed', 'expired', 'canceled'));

-- Waiting states rank with `held`: before any send, never final.
CREATE OR REPLACE FUNCTION job_status_rank(p_status text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status
        WHEN 'scheduled' THEN 1 WHEN 'deferred' THEN 1 WHEN 'queued' THEN 1 WHEN 'held' THEN 1
        WHEN 'sending' THEN 2 WHEN 'retry_wait' THEN 2 WHEN 'unknown' THEN 3
        WHEN 'sent' THEN 4 ELSE 5 END
$$;


-- As in 0019, with the candidate built field by field.
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
           OR existing.payload - 'created_at' IS DISTINCT FROM p_payload - 'created_at' THEN
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
