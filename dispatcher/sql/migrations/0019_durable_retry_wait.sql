-- Every non-final job state has a durable way forward (issue 12).
--
-- `retry_wait` had none of its own: the job was sent again by whoever decided to retry it, in
-- that process (the reconciler, the resumer, the broadcast runner), or by a retry-queue message
-- for consumed jobs only. A crash in between, or a caller that ignored the retry, left the job
-- waiting for ever with its credits reserved. Now each retry_wait job carries the time it is due
-- (`retry_at`), and a sweeper claims due jobs (FOR UPDATE SKIP LOCKED, one claim per job) and
-- sends them through the normal path. A consumed job's retry-queue message may still come back
-- first: begin_job moves retry_wait to sending for one of the two only.

ALTER TABLE jobs ADD COLUMN retry_at timestamptz;

UPDATE jobs SET retry_at = now() WHERE status = 'retry_wait';

CREATE INDEX jobs_retry_due ON jobs (retry_at) WHERE status = 'retry_wait';
-- `dispatcher jobs unresolved` and the overdue gauge look at every unfinished, unheld state.
CREATE INDEX jobs_in_flight ON jobs (sending_at)
    WHERE status IN ('sending', 'retry_wait', 'unknown');


-- As in 0002, with the retry time: due after p_delay_seconds (0: at once).
DROP FUNCTION job_retry_later(text, text, integer);
CREATE FUNCTION job_retry_later(p_job_id text, p_reason text, p_error_code integer,
                                p_delay_seconds double precision DEFAULT 0)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET status = 'retry_wait', reason = p_reason, error_code = p_error_code,
                    retry_at = now() + make_interval(secs => greatest(p_delay_seconds, 0)),
                    updated_at = now()
     WHERE job_id = p_job_id AND status = 'sending';
    RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
END $$;


-- As in 0015 (a reused id with other content is a conflict); the candidate row has the new
-- column (a ROW of the old width no longer casts).
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
    candidate := ROW(p_job_id, p_account, p_kind, p_priority, 'sending', p_payload, p_estimate,
                     p_country, p_units, p_rate, p_broadcast_id, NULL, 1, NULL, NULL, NULL,
                     NULL, NULL, now(), now(), now(), NULL, NULL)::jobs;
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
