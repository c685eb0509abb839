-- Status events as the contract documents them (docs/asyncapi.yaml, contract.StatusEvent):
-- routing key `status.<kind>.<status>`, and one id for the AMQP message_id and the body's
-- event_id, so consumers deduplicate by either. 0002 wrote `job.<status>` and two ids.
-- Billing events also get their own index: the relay claims them ahead of status events, so a
-- burst of status events never delays a balance.low.

CREATE OR REPLACE FUNCTION emit_job_event(p_job jobs, p_status text, p_reason text) RETURNS void
LANGUAGE sql AS $$
    WITH id AS (SELECT gen_random_uuid() AS event_id)
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT id.event_id, 'events', 'status.' || p_job.kind || '.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', id.event_id, 'job_id', p_job.job_id,
        'account', p_job.account_id, 'kind', p_job.kind, 'status', p_status,
        'reason', p_reason, 'provider_sid', p_job.provider_sid,
        'segments', CASE WHEN p_job.kind = 'sms' THEN p_job.units END,
        'credits', coalesce(p_job.final_cost, p_job.estimate),
        'metadata', coalesce(p_job.payload -> 'metadata', '{}'::jsonb),
        'broadcast_id', p_job.broadcast_id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
      FROM id
$$;

CREATE INDEX outbox_unpublished_billing ON outbox (id)
    WHERE published_at IS NULL AND exchange = 'billing';
