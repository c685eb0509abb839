-- emit_job_event (0009) as it was, in plpgsql. A LANGUAGE sql function that cannot be inlined
-- (an INSERT never is) keeps its parsed and planned body only for one execution of the calling
-- statement, so each PERFORM from the job functions parsed and planned the INSERT again; a
-- plpgsql function keeps its statement's plan for the session. Same rows, same keys: one event
-- id for the outbox row and the body, generated once per call.

CREATE OR REPLACE FUNCTION emit_job_event(p_job jobs, p_status text, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := gen_random_uuid();
BEGIN
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    VALUES (v_event_id, 'events', 'status.' || p_job.kind || '.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', v_event_id, 'job_id', p_job.job_id,
        'account', p_job.account_id, 'kind', p_job.kind, 'status', p_status,
        'reason', p_reason, 'provider_sid', p_job.provider_sid,
        'segments', CASE WHEN p_job.kind = 'sms' THEN p_job.units END,
        'credits', coalesce(p_job.final_cost, p_job.estimate),
        'metadata', coalesce(p_job.payload -> 'metadata', '{}'::jsonb),
        'broadcast_id', p_job.broadcast_id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')));
END $$;
