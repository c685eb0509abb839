-- A cancel stops every recipient of the broadcast whose provider call has not started (issue 13).
--
-- Recipients reserved by a broadcast batch (or released from hold) are `sending` while they wait
-- for their sender's rate-limit turn and a provider slot, possibly for many seconds; cancel
-- left them alone, so they were sent and charged after it answered. Now the last check is in
-- the database: right before the provider call the sender claims the job (claim_job_send),
-- which stamps the recipient's send_claimed_at, and cancel ends, in its own transaction, every
-- job of the broadcast not claimed yet (`held`, `retry_wait`, and `sending` with no claim):
-- `canceled`, credits released. The claim of such a job then fails and nothing reaches the
-- provider. A claimed job is in flight (its create may have reached the provider) and
-- finishes normally.
--
-- The mark is on broadcast_recipients, not jobs: `jobs` is built positionally as a row in
-- begin_job, so a new column there would break it.

ALTER TABLE broadcast_recipients ADD COLUMN send_claimed_at timestamptz;

COMMENT ON COLUMN broadcast_recipients.send_claimed_at IS
    'When the recipient''s job was first claimed for its provider call; NULL while it waits '
    '(rate limit, provider slot). A cancel ends the recipient''s `sending` job only while NULL.';


-- The claim right before a provider call: the job must still be `sending` at the caller's
-- attempt (else the reconciler took it over, or a cancel ended it). Returns 'claimed', or the
-- job's status. A job of a canceled broadcast is never claimed: one the cancel left alone
-- because it had been claimed before (then resent after a lookup found nothing at the
-- provider) ends `canceled` here, its credits released.
CREATE FUNCTION claim_job_send(p_job_id text, p_attempt integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    acct_id text;
    bc text;
BEGIN
    SELECT account_id, broadcast_id INTO acct_id, bc FROM jobs WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN 'unknown_job';
    END IF;
    IF bc IS NOT NULL
       AND EXISTS (SELECT 1 FROM broadcasts WHERE id = bc AND status = 'canceled') THEN
        PERFORM 1 FROM accounts WHERE id = acct_id FOR UPDATE;
        SELECT * INTO j FROM jobs WHERE job_id = p_job_id FOR UPDATE;
        IF j.status = 'sending' AND j.attempts = p_attempt THEN
            RETURN job_not_sent(p_job_id, 'canceled', 'broadcast_canceled', NULL);
        END IF;
        RETURN j.status;
    END IF;
    UPDATE jobs SET updated_at = now()
     WHERE job_id = p_job_id AND status = 'sending' AND attempts = p_attempt
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN (SELECT status FROM jobs WHERE job_id = p_job_id);
    END IF;
    IF bc IS NOT NULL THEN
        -- Job ids of a broadcast are `<broadcast>:<seq>` (the runner makes them).
        UPDATE broadcast_recipients SET send_claimed_at = coalesce(send_claimed_at, now())
         WHERE broadcast_id = bc AND seq = substr(p_job_id, length(bc) + 2)::integer;
    END IF;
    RETURN 'claimed';
END $$;


-- As in 0011, and the broadcast's jobs that are reserved but not yet claimed for their
-- provider call are canceled too, their credits released. The jobs are locked in job id
-- order (as jobs_accepted locks them); once a job is locked, its recipient's claim is read
-- again (a new statement sees a claim that committed while we waited for the lock; a claim
-- that comes after waits for us and then finds the job `canceled`): a job is either claimed
-- and sent, or canceled and released, never both and never neither.
CREATE OR REPLACE FUNCTION cancel_broadcast(p_broadcast text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    j record;
    dropped bigint;
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
        RETURNING 1)
    SELECT count(*) INTO dropped FROM c;
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
    UPDATE broadcast_counts
       SET pending = pending - dropped, recipients_canceled = recipients_canceled + dropped
     WHERE broadcast_id = p_broadcast;
    RETURN 'canceled';
END $$;
