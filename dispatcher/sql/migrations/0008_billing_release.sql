-- A resume that runs out of credits again tells billing with a new balance.depleted, once per
-- pass of the resumer: on the call that could release nothing more. (0008_billing.sql emitted
-- it on the call that released the last affordable jobs, which a batch boundary can skip:
-- when the credits run out exactly at the end of a batch, that call is not short yet.)
-- The resumer always ends a pass that released jobs with such a call, and a wake-up whose
-- credits cannot pay for the next held job is one.

CREATE OR REPLACE FUNCTION release_held(p_account text, p_limit integer)
RETURNS TABLE (job_id text, payload jsonb, kind text, attempts integer, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    ids text[];
    estimates bigint[];
    released text[];
    short boolean;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND OR acct.paused_at IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(h.job_id ORDER BY h.hold_seq), array_agg(h.estimate ORDER BY h.hold_seq)
      INTO ids, estimates
      FROM (SELECT j.job_id, j.estimate, j.hold_seq FROM jobs j
             WHERE j.account_id = p_account AND j.status = 'held'
             ORDER BY j.hold_seq LIMIT p_limit) h;
    IF ids IS NULL THEN
        UPDATE accounts SET paused_at = NULL WHERE id = p_account;
        INSERT INTO outbox (event_id, exchange, routing_key, body)
        SELECT e.id, 'events', 'account.resumed', jsonb_build_object(
            'schema_version', 1, 'event_id', e.id, 'account', p_account, 'status', 'resumed',
            'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
          FROM (SELECT gen_random_uuid() AS id) e;
        RETURN QUERY SELECT NULL::text, NULL::jsonb, NULL::text, 0, 'resumed'::text;
        RETURN;
    END IF;
    SELECT array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'),
           bool_or(r.status = 'insufficient')
      INTO released, short
      FROM reserve_batch(p_account, ids, estimates) r;
    UPDATE jobs j SET status = 'sending', attempts = 1, updated_at = now(), sending_at = now()
     WHERE j.job_id = ANY(coalesce(released, '{}'));
    RETURN QUERY
        SELECT j.job_id, j.payload, j.kind, j.attempts, 'released'::text
          FROM jobs j WHERE j.job_id = ANY(coalesce(released, '{}')) ORDER BY j.hold_seq;
    IF short THEN
        IF released IS NULL THEN
            PERFORM emit_still_depleted(p_account);
        END IF;
        RETURN QUERY SELECT NULL::text, NULL::jsonb, NULL::text, 0, 'still_paused'::text;
    END IF;
END $$;
