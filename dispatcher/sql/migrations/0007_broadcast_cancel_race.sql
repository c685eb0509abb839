-- A batch begun while a cancel commits must not reserve or send: read the broadcast's status
-- again once the account row is locked (cancel_broadcast takes the same lock), and turn into
-- jobs only recipients that are still pending.

CREATE OR REPLACE FUNCTION begin_broadcast_batch(
    p_broadcast text, p_seqs integer[], p_job_ids text[], p_payloads jsonb[],
    p_estimates bigint[], p_countries text[], p_units integer[], p_rates bigint[]
) RETURNS TABLE (job_id text)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    acct accounts%ROWTYPE;
    live integer[];
    ids text[];
    estimates bigint[];
    reserved text[] := '{}';
    short boolean := false;
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
    WITH claimed AS (
        UPDATE broadcast_recipients SET status = 'queued'
         WHERE broadcast_id = p_broadcast AND seq = ANY(p_seqs) AND status = 'pending'
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
    INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate, country,
                      units, rate, broadcast_id, hold_seq, attempts, sending_at)
    SELECT u.job_id, b.account_id, 'sms', b.priority,
           CASE WHEN u.job_id = ANY(reserved) THEN 'sending' ELSE 'held' END,
           u.payload, u.estimate, u.country, u.units, u.rate, p_broadcast,
           CASE WHEN u.job_id = ANY(reserved) THEN NULL ELSE nextval('job_hold_seq') END,
           CASE WHEN u.job_id = ANY(reserved) THEN 1 ELSE 0 END,
           CASE WHEN u.job_id = ANY(reserved) THEN now() END
      FROM unnest(p_seqs, p_job_ids, p_payloads, p_estimates, p_countries, p_units, p_rates)
           WITH ORDINALITY AS u(seq, job_id, payload, estimate, country, units, rate, ord)
     WHERE u.seq = ANY(live)
     ORDER BY u.ord
    ON CONFLICT DO NOTHING;
    IF short THEN
        PERFORM pause_account(b.account_id);
    END IF;
    RETURN QUERY SELECT x FROM unnest(reserved) AS x;
END $$;
