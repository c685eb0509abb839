-- A reused job id with a different job is a conflict, never a silent duplicate.
--
-- begin_job (0002) answered 'duplicate' for any row already under the job id of the same
-- account, so a publisher that reused an id for another message lost it without a trace (and a
-- job waiting in retry_wait would even have been sent with the new content). Now the stored
-- payload is the fingerprint: the canonical job as the contract decoded and re-encoded it
-- (defaults filled in, aliases, no nulls), less `created_at`, which the publisher helper stamps
-- on each publish. Same content: 'duplicate' (or the retry resumes); different: 'conflict', and
-- nothing of the first job is touched.
--
-- Broadcasts published over AMQP use their job id as broadcast id: `fingerprint` holds the
-- SHA-256 of their canonical content so that a reused id with another broadcast is told apart.
-- NULL for broadcasts submitted over HTTP (their ids are generated) and those stored before.

ALTER TABLE broadcasts ADD COLUMN fingerprint text;

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


-- Opt-outs hold numbers in canonical E.164 form as libphonenumber has them (``canonical_number``):
-- some valid numbers have more than 15 digits (German fixed lines reach 17 after +49), which
-- the 0004 check refused. A calling code and at most 17 national digits: 20 digits.
ALTER TABLE opt_outs DROP CONSTRAINT opt_outs_number_check;
ALTER TABLE opt_outs ADD CONSTRAINT opt_outs_number_check
    CHECK (number ~ '^\+[1-9][0-9]{1,19}$');
