-- Held jobs expired by the sweep, counted by kind: dispatcher_jobs_total{outcome="expired"}
-- was labelled `sms` for every job, calls included. Broadcast recipients are `sms` jobs.
--
-- Each job is also checked again under its account's lock: the scan takes no lock, so a job
-- released by the resumer in the meantime (now `sending`) was failed by job_not_sent (which
-- acts on any unfinished job) while it was being sent, and counted as expired.


CREATE FUNCTION expire_held_by_kind(p_before timestamptz, p_limit integer)
RETURNS TABLE (kind text, expired integer)
LANGUAGE plpgsql AS $$
DECLARE
    h record;
    kinds text[] := '{}';
BEGIN
    FOR h IN SELECT j.job_id, j.account_id, j.kind FROM jobs j
              WHERE j.status = 'held' AND j.created_at < p_before
              ORDER BY j.hold_seq LIMIT p_limit LOOP
        PERFORM 1 FROM accounts a WHERE a.id = h.account_id FOR UPDATE;
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = h.job_id
                                                          AND j.status = 'held');
        PERFORM job_not_sent(h.job_id, 'failed', 'insufficient_credits', NULL);
        kinds := kinds || h.kind;
    END LOOP;
    RETURN QUERY SELECT k, count(*)::integer FROM unnest(kinds) AS k GROUP BY k;
END $$;


-- The previous release's entry point, for replicas still running it during a rolling upgrade.
CREATE OR REPLACE FUNCTION expire_held(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(e.expired), 0)::integer FROM expire_held_by_kind(p_before, p_limit) e
$$;
