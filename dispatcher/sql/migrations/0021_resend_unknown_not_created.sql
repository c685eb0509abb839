-- An `unknown` job (its create timed out or met a 5xx) that the provider's complete answer shows
-- it never created is sent again, like a `sending` job orphaned by a crash: it becomes
-- `retry_wait`, due at once, and the retry sweeper sends it. Before, it waited for an operator
-- for ever with its credits reserved, though nothing was in doubt. A call that could not be told
-- apart from another (reason provider_lookup_ambiguous) or a job bound to a SID never moves here.
CREATE FUNCTION job_retry_not_created(p_job_id text, p_reason text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET status = 'retry_wait', reason = p_reason, retry_at = now(),
                    updated_at = now()
     WHERE job_id = p_job_id AND status = 'unknown' AND provider_sid IS NULL
       AND reason IS DISTINCT FROM 'provider_lookup_ambiguous';
    RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
END $$;
