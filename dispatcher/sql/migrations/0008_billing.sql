-- Billing events, the rules of issue 4 made exact:
--   * balance.low once per episode: an episode closes only when credits *arrive* (a grant, an
--     allocation, a plan upgrade: the balance rises while nothing reserved changes) and lift
--     the balance to the threshold or above. A reservation given back (a failed send) does
--     not close it, so it cannot make a second balance.low in the same episode.
--   * At zero or below a top-up is requested even with auto-recharge off, using the last
--     saved settings, unless the account opted out (topup_at_zero = false). Such an episode
--     (auto-recharge off) closes as soon as credits lift the balance above zero.
--   * balance.low carries the shortfall (threshold - available) so that billing makes one
--     charge large enough to close it, and says when the top-up is asked for even though
--     auto-recharge is off.
--   * A resume that runs out of credits again (the grant did not cover every held job) tells
--     billing with a new balance.depleted: the account is still paused, the rest still held.
--   * A held job that waits past the limit fails with reason insufficient_credits.

CREATE OR REPLACE FUNCTION accounts_low_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    avail bigint := NEW.sub_available + NEW.purchased_available - NEW.debt;
    old_avail bigint := OLD.sub_available + OLD.purchased_available - OLD.debt;
    threshold bigint := NEW.auto_recharge_threshold;
    credits_arrived boolean := avail > old_avail AND NEW.reserved = OLD.reserved;
    at_zero boolean := avail <= 0 AND NEW.topup_at_zero;
BEGIN
    IF NEW.paused_at IS NOT NULL AND avail > old_avail AND avail > 0 THEN
        PERFORM pg_notify('dispatcher_resume', NEW.id);
    END IF;
    IF NEW.low_balance_open THEN
        IF credits_arrived AND avail > 0
           AND (avail >= threshold OR NOT NEW.auto_recharge_enabled) THEN
            NEW.low_balance_open := false;
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.auto_recharge_enabled AND avail < threshold) OR at_zero THEN
        NEW.low_balance_open := true;
        NEW.low_balance_episode := NEW.low_balance_episode + 1;
        INSERT INTO outbox (event_id, exchange, routing_key, body)
        SELECT e.id, 'billing', 'balance.low', jsonb_build_object(
            'schema_version', 1, 'type', 'balance.low', 'event_id', e.id,
            'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'account', NEW.id, 'available', avail, 'threshold', threshold,
            'episode', NEW.low_balance_episode,
            'shortfall', greatest(threshold - avail, 0),
            'auto_recharge', jsonb_build_object(
                'enabled', NEW.auto_recharge_enabled, 'threshold', threshold,
                'amount', NEW.auto_recharge_amount),
            'topup_requested_even_if_disabled', NOT NEW.auto_recharge_enabled AND at_zero,
            'topup_at_zero', NEW.topup_at_zero)
          FROM (SELECT gen_random_uuid() AS id) e;
    END IF;
    RETURN NEW;
END $$;


-- balance.depleted for an account that stays paused: the credits that arrived released some
-- held jobs but not all of them.
CREATE FUNCTION emit_still_depleted(p_account text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    held_count bigint;
    held_credits bigint;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account;
    SELECT count(*), coalesce(sum(estimate), 0) INTO held_count, held_credits
      FROM jobs WHERE account_id = p_account AND status = 'held';
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT e.id, 'billing', 'balance.depleted', jsonb_build_object(
        'schema_version', 1, 'type', 'balance.depleted', 'event_id', e.id,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'account', p_account,
        'available', acct.sub_available + acct.purchased_available - acct.debt,
        'held_jobs', held_count, 'held_credits', held_credits,
        'episode', greatest(acct.low_balance_episode, 1),
        'auto_recharge', jsonb_build_object(
            'enabled', acct.auto_recharge_enabled, 'threshold', acct.auto_recharge_threshold,
            'amount', acct.auto_recharge_amount),
        'topup_requested_even_if_disabled',
            NOT acct.auto_recharge_enabled AND acct.topup_at_zero)
      FROM (SELECT gen_random_uuid() AS id) e;
END $$;


-- A resume that runs out of credits again tells billing with a new balance.depleted, once per
-- pass of the resumer: on the call that could release nothing more (the call that released the
-- last affordable jobs is not short yet when the credits run out exactly at a batch boundary).
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


CREATE OR REPLACE FUNCTION expire_held(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    n integer := 0;
BEGIN
    FOR j IN SELECT job_id FROM jobs WHERE status = 'held' AND created_at < p_before
              ORDER BY hold_seq LIMIT p_limit LOOP
        PERFORM job_not_sent(j.job_id, 'failed', 'insufficient_credits', NULL);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
