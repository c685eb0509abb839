-- Resume by itself: when a paused account's available credits grow, NOTIFY the resumer, which
-- releases held jobs in arrival order as far as credits allow (see release_held).

CREATE OR REPLACE FUNCTION accounts_low_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    avail bigint := NEW.sub_available + NEW.purchased_available - NEW.debt;
    old_avail bigint := OLD.sub_available + OLD.purchased_available - OLD.debt;
    threshold bigint := NEW.auto_recharge_threshold;
BEGIN
    IF NEW.paused_at IS NOT NULL AND avail > old_avail AND avail > 0 THEN
        PERFORM pg_notify('dispatcher_resume', NEW.id);
    END IF;
    IF NEW.low_balance_open AND avail >= threshold AND avail > 0 THEN
        NEW.low_balance_open := false;
    ELSIF NOT NEW.low_balance_open
          AND (avail < threshold OR (avail <= 0 AND NEW.topup_at_zero))
          AND (NEW.auto_recharge_enabled OR (avail <= 0 AND NEW.topup_at_zero)) THEN
        NEW.low_balance_open := true;
        NEW.low_balance_episode := NEW.low_balance_episode + 1;
        INSERT INTO outbox (event_id, exchange, routing_key, body)
        SELECT e.id, 'billing', 'balance.low', jsonb_build_object(
            'schema_version', 1, 'type', 'balance.low', 'event_id', e.id,
            'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'account', NEW.id, 'available', avail, 'threshold', threshold,
            'episode', NEW.low_balance_episode,
            'auto_recharge', jsonb_build_object(
                'enabled', NEW.auto_recharge_enabled, 'threshold', threshold,
                'amount', NEW.auto_recharge_amount),
            'topup_at_zero', NEW.topup_at_zero)
          FROM (SELECT gen_random_uuid() AS id) e;
    END IF;
    RETURN NEW;
END $$;


-- Release up to p_limit held jobs of a paused account, oldest first, reserving their credits
-- in order. Returns the released jobs (now `sending`, to be sent by the caller in this order).
-- When no held job is left the account is resumed; when credits run out it stays paused.
CREATE FUNCTION release_held(p_account text, p_limit integer)
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
        RETURN QUERY SELECT NULL::text, NULL::jsonb, NULL::text, 0, 'still_paused'::text;
    END IF;
END $$;


-- Expire held jobs that waited too long: final status `expired`, reason insufficient_credits.
CREATE FUNCTION expire_held(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    n integer := 0;
BEGIN
    FOR j IN SELECT job_id FROM jobs WHERE status = 'held' AND created_at < p_before
              ORDER BY hold_seq LIMIT p_limit LOOP
        PERFORM job_not_sent(j.job_id, 'expired', 'insufficient_credits', NULL);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
