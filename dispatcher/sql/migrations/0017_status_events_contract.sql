-- Status events as docs/asyncapi.yaml documents them (issue 14), checked against the running
-- service by tests/integration/test_event_contract.py:
--
-- 1. A broadcast's recipients are `status.broadcast.<status>` with `kind: broadcast` and the
--    broadcast id beside the job id; they were `status.sms.*`. Their `metadata` is the
--    broadcast's own (stored on the broadcast, copied into each recipient's payload by the
--    runner), where it was replaced by {"broadcast_id": ...}.
-- 2. Every recipient gets an event: skipped ones (`skipped`, reason invalid / opted_out /
--    duplicate / missing_variable) when the broadcast is stored, held ones (`held`) when their
--    batch is held, and pending ones dropped by a cancel (`canceled`, broadcast_canceled).
--    Before, only held single jobs had a `held` event and the rest of these had none.
-- 3. A rejected job whose id, account and kind could be read gets `dead_lettered`.

ALTER TABLE broadcasts ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';


CREATE OR REPLACE FUNCTION emit_job_event(p_job jobs, p_status text, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := gen_random_uuid();
    v_kind text := CASE WHEN p_job.broadcast_id IS NULL OR p_job.kind IS NULL THEN p_job.kind
                        ELSE 'broadcast' END;
BEGIN
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    VALUES (v_event_id, 'events', 'status.' || v_kind || '.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', v_event_id, 'job_id', p_job.job_id,
        'account', p_job.account_id, 'kind', v_kind, 'status', p_status,
        'reason', p_reason, 'provider_sid', p_job.provider_sid,
        'segments', CASE WHEN p_job.kind = 'sms' THEN p_job.units END,
        'credits', coalesce(p_job.final_cost, p_job.estimate),
        'metadata', coalesce(p_job.payload -> 'metadata', '{}'::jsonb),
        'broadcast_id', p_job.broadcast_id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')));
END $$;


-- Events of recipients that never became jobs (skipped, or dropped by a cancel): nothing was
-- reserved, so `credits` is 0. The reason is p_reason, else the recipient's skip reason.
CREATE FUNCTION emit_recipient_events(p_broadcast text, p_seqs integer[], p_status text,
                                      p_reason text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT x.event_id, 'events', 'status.broadcast.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', x.event_id, 'job_id', x.broadcast_id || ':' || x.seq,
        'account', x.account_id, 'kind', 'broadcast', 'status', p_status,
        'reason', coalesce(p_reason, x.skip_reason), 'provider_sid', NULL::text,
        'segments', NULL::integer, 'credits', 0, 'metadata', x.metadata,
        'broadcast_id', x.broadcast_id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
      FROM (SELECT gen_random_uuid() AS event_id, r.broadcast_id, r.seq, r.skip_reason,
                   b.account_id, b.metadata
              FROM broadcasts b
              JOIN broadcast_recipients r ON r.broadcast_id = b.id
             WHERE b.id = p_broadcast AND r.seq = ANY(p_seqs)
             ORDER BY r.seq
            OFFSET 0) x  -- kept apart: one event id per row, used twice
     ORDER BY x.seq
$$;


-- The skipped recipients of a broadcast just stored (called in the storing transaction).
CREATE FUNCTION emit_broadcast_skipped(p_broadcast text) RETURNS void
LANGUAGE sql AS $$
    SELECT emit_recipient_events(p_broadcast, array_agg(r.seq ORDER BY r.seq), 'skipped', NULL)
      FROM broadcast_recipients r
     WHERE r.broadcast_id = p_broadcast AND r.status = 'skipped'
$$;


-- A job refused before it existed (invalid, unknown account, foreign job id...): nothing was
-- reserved. A broadcast refused whole carries its own id as broadcast_id.
CREATE FUNCTION emit_dead_lettered(p_job_id text, p_account text, p_kind text, p_reason text,
                                   p_metadata jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := gen_random_uuid();
BEGIN
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    VALUES (v_event_id, 'events', 'status.' || p_kind || '.dead_lettered', jsonb_build_object(
        'schema_version', 1, 'event_id', v_event_id, 'job_id', p_job_id,
        'account', p_account, 'kind', p_kind, 'status', 'dead_lettered',
        'reason', p_reason, 'provider_sid', NULL::text, 'segments', NULL::integer,
        'credits', 0, 'metadata', coalesce(p_metadata, '{}'::jsonb),
        'broadcast_id', CASE WHEN p_kind = 'broadcast' THEN p_job_id END,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')));
END $$;


-- As in 0011, plus a `held` event for each recipient held (single jobs had one, hold_job).
CREATE OR REPLACE FUNCTION begin_broadcast_batch(
    p_broadcast text, p_seqs integer[], p_job_ids text[], p_payloads jsonb[],
    p_estimates bigint[], p_countries text[], p_units integer[], p_rates bigint[]
) RETURNS TABLE (job_id text)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    acct accounts%ROWTYPE;
    lo integer;
    hi integer;
    live integer[];
    ids text[];
    estimates bigint[];
    reserved text[] := '{}';
    short boolean := false;
    new_sending bigint;
    new_held bigint;
    new_reserved bigint;
    held_ids text[];
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;  -- after the lock: sees a cancel
    IF b.status <> 'running' THEN
        RETURN;
    END IF;
    SELECT min(s), max(s) INTO lo, hi FROM unnest(p_seqs) AS s;
    WITH claimed AS (
        UPDATE broadcast_recipients SET status = 'queued'
         WHERE broadcast_id = p_broadcast AND seq BETWEEN lo AND hi AND seq = ANY(p_seqs)
           AND status = 'pending'
        RETURNING seq)
    SELECT coalesce(array_agg(seq), '{}') INTO live FROM claimed;
    SELECT array_agg(u.job_id ORDER BY u.ord), array_agg(u.estimate ORDER BY u.ord)
      INTO ids, estimates
      FROM unnest(p_seqs, p_job_ids, p_estimates) WITH ORDINALITY AS u(seq, job_id, estimate, ord)
     WHERE u.seq = ANY(live);
    IF ids IS NULL THEN
        RETURN;
    END IF;
    IF acct.paused_at IS NULL THEN
        SELECT coalesce(array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'), '{}'),
               coalesce(bool_or(r.status = 'insufficient'), false)
          INTO reserved, short
          FROM reserve_batch(b.account_id, ids, estimates) r;
    ELSE
        short := true;
    END IF;
    WITH inserted AS (
        INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,
                          country, units, rate, broadcast_id, hold_seq, attempts, sending_at)
        SELECT u.job_id, b.account_id, 'sms', b.priority,
               CASE WHEN u.job_id = ANY(reserved) THEN 'sending' ELSE 'held' END,
               u.payload, u.estimate, u.country, u.units, u.rate, p_broadcast,
               CASE WHEN u.job_id = ANY(reserved) THEN NULL ELSE nextval('job_hold_seq') END,
               CASE WHEN u.job_id = ANY(reserved) THEN 1 ELSE 0 END,
               CASE WHEN u.job_id = ANY(reserved) THEN now() END
          FROM unnest(p_seqs, p_job_ids, p_payloads, p_estimates, p_countries, p_units,
                      p_rates)
               WITH ORDINALITY AS u(seq, job_id, payload, estimate, country, units, rate, ord)
         WHERE u.seq = ANY(live)
         ORDER BY u.ord
        ON CONFLICT DO NOTHING
        RETURNING jobs.job_id, status, estimate, hold_seq)
    SELECT count(*) FILTER (WHERE i.status = 'sending'), count(*) FILTER (WHERE i.status = 'held'),
           coalesce(sum(i.estimate) FILTER (WHERE i.status = 'sending'), 0),
           array_agg(i.job_id ORDER BY i.hold_seq) FILTER (WHERE i.status = 'held')
      INTO new_sending, new_held, new_reserved, held_ids
      FROM inserted i;
    IF held_ids IS NOT NULL THEN
        PERFORM emit_job_event(j, 'held', 'insufficient_credits')
           FROM jobs j WHERE j.job_id = ANY(held_ids) ORDER BY j.hold_seq;
    END IF;
    IF short THEN
        PERFORM pause_account(b.account_id);
    END IF;
    -- The jobs of a broadcast are inserted here only, and counted here (the trigger on jobs
    -- counts their later changes): one update of the counts row per batch.
    UPDATE broadcast_counts
       SET pending = pending - cardinality(live), sending = sending + new_sending,
           held = held + new_held, credits_reserved = credits_reserved + new_reserved
     WHERE broadcast_id = p_broadcast;
    RETURN QUERY SELECT x FROM unnest(reserved) AS x;
END $$;


-- As in 0016, plus a `canceled` event for each pending recipient it drops (held ones get
-- theirs from job_not_sent).
CREATE OR REPLACE FUNCTION cancel_broadcast(p_broadcast text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    j record;
    dropped integer[];
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    PERFORM 1 FROM accounts WHERE id = b.account_id FOR UPDATE;
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF b.status <> 'running' THEN
        RETURN b.status;
    END IF;
    UPDATE broadcasts SET status = 'canceled', finished_at = now() WHERE id = p_broadcast;
    WITH c AS (
        UPDATE broadcast_recipients SET status = 'canceled'
         WHERE broadcast_id = p_broadcast AND status = 'pending'
        RETURNING seq)
    SELECT coalesce(array_agg(seq), '{}') INTO dropped FROM c;
    -- As in 0016: held, retry_wait and unclaimed sending jobs end canceled, locked in job id
    -- order, a claimed one (its create may be under way) left to finish.
    FOR j IN SELECT x.job_id, x.status FROM jobs x
              WHERE x.broadcast_id = p_broadcast AND x.status IN ('held', 'retry_wait', 'sending')
              ORDER BY x.job_id
                FOR UPDATE LOOP
        CONTINUE WHEN j.status = 'sending' AND EXISTS (
            SELECT 1 FROM broadcast_recipients r
             WHERE r.broadcast_id = p_broadcast
               AND r.seq = substr(j.job_id, length(p_broadcast) + 2)::integer
               AND r.send_claimed_at IS NOT NULL);
        PERFORM job_not_sent(j.job_id, 'canceled', 'broadcast_canceled', NULL);
    END LOOP;
    IF cardinality(dropped) > 0 THEN
        PERFORM emit_recipient_events(p_broadcast, dropped, 'canceled', 'broadcast_canceled');
    END IF;
    UPDATE broadcast_counts
       SET pending = pending - cardinality(dropped),
           recipients_canceled = recipients_canceled + cardinality(dropped)
     WHERE broadcast_id = p_broadcast;
    RETURN 'canceled';
END $$;
