-- Auto-recharge that cannot run away (issue 17, part 2), on the dispatcher's side:
--   * balance.low and balance.depleted carry a time-to-zero forecast, from the net credits the
--     account spent in the last hour (the ledger), and balance.low the number and value of
--     held jobs. Added by a trigger on the outbox, so none of the functions that emit these
--     events (accounts_low_balance, pause_account, emit_still_depleted) is redefined here.
--     The forecast is computed at commit: the ledger row of the reservation that crossed the
--     threshold is written after the balance change that emits the event.
--   * Auto-recharge settings whose amount cannot lift the balance above the threshold
--     ("below 500 add 100" from zero leaves 100: charge after charge) are refused on every
--     path that writes them (API, CLI, SQL): enabled => amount > threshold.
--   * Enabling auto-recharge while already below the threshold charges once at once: an
--     episode left open from before (opened at zero with auto-recharge off) is closed so that
--     accounts_low_balance, which fires after this trigger (alphabetical order), opens a new
--     one and emits one balance.low.
--   * Billing pauses auto-recharge after consecutive declines (topup.disabled): the dispatcher
--     turns it off too, unless an owner changed the settings since. An owner's change is
--     stamped (auto_recharge_changed_at, by the API and CLI queries) and travels on every
--     balance event as auto_recharge.changed_at: a change after the pause lifts it in billing.

ALTER TABLE accounts ADD COLUMN auto_recharge_changed_at timestamptz;


-- The forecast of one account at `p_available` credits: {window_seconds, spent,
-- seconds_to_zero}. Called at commit, so `spent` includes the change that emitted the event. Walks the ledger newest first (index ledger_account) and stops at the
-- hour's edge, or after 50 000 rows: then the window is as long as those rows cover.
CREATE FUNCTION balance_forecast(p_account text, p_available bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cutoff timestamptz := now() - interval '1 hour';
    window_seconds bigint := 3600;
    spent bigint := 0;
    seen integer := 0;
    r record;
BEGIN
    FOR r IN SELECT l.kind, l.sub_delta, l.purchased_delta, l.debt_delta, l.created_at
               FROM ledger l WHERE l.account_id = p_account ORDER BY l.id DESC LOOP
        EXIT WHEN r.created_at < cutoff;
        seen := seen + 1;
        IF seen > 50000 THEN
            window_seconds := greatest(1, ceil(extract(epoch FROM now() - r.created_at)));
            EXIT;
        END IF;
        -- Spending moves credits out of the available buckets: reserved, captured beyond the
        -- estimate, or given back (a release counts negative).
        IF r.kind IN ('reserve', 'capture', 'release') THEN
            spent := spent - (r.sub_delta + r.purchased_delta - r.debt_delta);
        END IF;
    END LOOP;
    spent := greatest(spent, 0);
    RETURN jsonb_build_object(
        'window_seconds', window_seconds, 'spent', spent,
        'seconds_to_zero', CASE WHEN p_available <= 0 THEN 0
                                WHEN spent = 0 THEN NULL
                                ELSE ceil(p_available::numeric * window_seconds / spent)::bigint
                           END);
END $$;


-- Filled in at commit (a deferred constraint trigger), when the ledger rows of the change that
-- emitted the event are written too; the row is not visible to the relay before the commit.
CREATE FUNCTION outbox_balance_forecast() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    account text := NEW.body ->> 'account';
    changed text;
    extra jsonb;
BEGIN
    IF account IS NULL OR jsonb_typeof(NEW.body -> 'auto_recharge') IS DISTINCT FROM 'object' THEN
        RETURN NULL;  -- not an event this migration knows how to complete
    END IF;
    SELECT to_char(a.auto_recharge_changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
      INTO changed FROM accounts a WHERE a.id = account;
    extra := jsonb_build_object(
        'forecast', balance_forecast(account, coalesce((NEW.body ->> 'available')::bigint, 0)),
        'auto_recharge', (NEW.body -> 'auto_recharge')
                         || jsonb_build_object('changed_at', changed));
    IF NEW.routing_key = 'balance.low' THEN
        SELECT extra || jsonb_build_object('held_jobs', count(*),
                                           'held_credits', coalesce(sum(estimate), 0))
          INTO extra
          FROM jobs WHERE account_id = account AND status = 'held';
    END IF;
    UPDATE outbox SET body = body || extra WHERE id = NEW.id;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER outbox_balance_forecast AFTER INSERT ON outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.exchange = 'billing' AND NEW.routing_key IN ('balance.low', 'balance.depleted'))
    EXECUTE FUNCTION outbox_balance_forecast();


CREATE FUNCTION accounts_check_auto_recharge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.auto_recharge_enabled AND NEW.auto_recharge_amount <= NEW.auto_recharge_threshold
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation', CONSTRAINT = 'auto_recharge_lifts_threshold',
            MESSAGE = format('auto_recharge_amount (%s) must be greater than '
                             'auto_recharge_threshold (%s): one top-up from zero must lift the '
                             'balance above the threshold, or it would charge again and again',
                             NEW.auto_recharge_amount, NEW.auto_recharge_threshold);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_check_auto_recharge
    BEFORE INSERT OR UPDATE OF auto_recharge_enabled, auto_recharge_threshold,
                               auto_recharge_amount ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_check_auto_recharge();


CREATE FUNCTION accounts_enable_recharge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.low_balance_open
       AND NEW.sub_available + NEW.purchased_available - NEW.debt < NEW.auto_recharge_threshold
    THEN
        NEW.low_balance_open := false;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_enable_recharge BEFORE UPDATE ON accounts
    FOR EACH ROW
    WHEN (NOT OLD.auto_recharge_enabled AND NEW.auto_recharge_enabled)
    EXECUTE FUNCTION accounts_enable_recharge();
