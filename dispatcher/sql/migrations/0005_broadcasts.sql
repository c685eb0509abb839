-- Broadcasts: one submission fanned out to per-recipient SMS jobs, reserved in batches with
-- reserve_batch, pausing and resuming with the account like any other job.

CREATE TABLE broadcasts (
    id                     text PRIMARY KEY,
    account_id             text NOT NULL REFERENCES accounts (id),
    status                 text NOT NULL DEFAULT 'running'
                           CHECK (status IN ('running', 'completed', 'canceled')),
    priority               text NOT NULL DEFAULT 'bulk',
    sender                 text,
    messaging_service_sid  text,
    body                   text NOT NULL,
    footer                 boolean NOT NULL DEFAULT false,
    total                  integer NOT NULL,
    skipped                integer NOT NULL DEFAULT 0,
    estimate               bigint NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now(),
    finished_at            timestamptz
);
CREATE INDEX broadcasts_running ON broadcasts (created_at) WHERE status = 'running';

CREATE TABLE broadcast_recipients (
    broadcast_id  text NOT NULL REFERENCES broadcasts (id),
    seq           integer NOT NULL,
    to_number     text NOT NULL,
    vars          jsonb NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'queued', 'skipped', 'canceled')),
    skip_reason   text,
    PRIMARY KEY (broadcast_id, seq)
);
CREATE INDEX broadcast_recipients_pending ON broadcast_recipients (broadcast_id, seq)
    WHERE status = 'pending';


-- Turn a batch of a broadcast's pending recipients into jobs: reserve in order as far as the
-- balance allows (`sending`), hold the rest (and pause the account). Returns the job ids the
-- caller must send now, in order.
CREATE FUNCTION begin_broadcast_batch(
    p_broadcast text, p_seqs integer[], p_job_ids text[], p_payloads jsonb[],
    p_estimates bigint[], p_countries text[], p_units integer[], p_rates bigint[]
) RETURNS TABLE (job_id text)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    acct accounts%ROWTYPE;
    reserved text[] := '{}';
    short boolean := false;
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    SELECT * INTO acct FROM accounts WHERE id = b.account_id FOR UPDATE;
    IF b.status <> 'running' THEN
        RETURN;
    END IF;
    IF acct.paused_at IS NULL THEN
        SELECT coalesce(array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'), '{}'),
               coalesce(bool_or(r.status = 'insufficient'), false)
          INTO reserved, short
          FROM reserve_batch(b.account_id, p_job_ids, p_estimates) r;
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
      FROM unnest(p_job_ids, p_payloads, p_estimates, p_countries, p_units, p_rates)
           WITH ORDINALITY AS u(job_id, payload, estimate, country, units, rate, ord)
     ORDER BY u.ord
    ON CONFLICT DO NOTHING;
    UPDATE broadcast_recipients SET status = 'queued'
     WHERE broadcast_id = p_broadcast AND seq = ANY(p_seqs) AND status = 'pending';
    IF short THEN
        PERFORM pause_account(b.account_id);
    END IF;
    RETURN QUERY SELECT x FROM unnest(reserved) AS x;
END $$;


-- Cancel: unsent recipients are dropped, held jobs end `canceled` (nothing was reserved for
-- them); jobs already sending finish normally.
CREATE FUNCTION cancel_broadcast(p_broadcast text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    j record;
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_broadcast;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    PERFORM 1 FROM accounts WHERE id = b.account_id FOR UPDATE;
    IF b.status <> 'running' THEN
        RETURN b.status;
    END IF;
    UPDATE broadcasts SET status = 'canceled', finished_at = now() WHERE id = p_broadcast;
    UPDATE broadcast_recipients SET status = 'canceled'
     WHERE broadcast_id = p_broadcast AND status = 'pending';
    FOR j IN SELECT job_id FROM jobs WHERE broadcast_id = p_broadcast AND status = 'held' LOOP
        PERFORM job_not_sent(j.job_id, 'canceled', 'broadcast_canceled', NULL);
    END LOOP;
    RETURN 'canceled';
END $$;
