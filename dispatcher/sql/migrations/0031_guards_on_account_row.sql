-- Spend guards at little cost (issue 17, part 2): the guards' settings and counters move into
-- the `accounts` row.
--
-- bench.guards measured a guarded one-job reservation at ~0.75x an unguarded one: besides the
-- account row, each paid an index probe and read of account_guards and an UPDATE of it (today's
-- spend, the velocity window), a second row version per reservation. Now:
--   * accounts carries every column account_guards had (`guards_set`: the account ever had its
--     guards set, i.e. it had an account_guards row; `guards_updated_at` was `updated_at`), read
--     by the SELECT ... FOR UPDATE that locks the account anyway. An account without guards
--     pays one boolean test (`guards_set`).
--   * A one-job reservation that passes every guard writes its counters in the same UPDATE as
--     the balance (reserve_one_locked, below): no extra row, no extra statement. reserve_one
--     (0028) keeps its answers and rows; its body moved into reserve_one_locked, shared with
--     reserve_guarded. Batches and the rarer paths (a job held or refused, a cap or hold ending)
--     still count with a second UPDATE, of the same (already locked) accounts row.
--   * account_guards is now a view over accounts (`WHERE guards_set`), updatable, with the same
--     columns: readers (guards_get, guard_held_accounts_due, load_guards, audit, tests) see no
--     change. guard_cap_history is kept by a trigger on accounts (a cap set or changed, or the
--     guards set for the first time), as the triggers on account_guards did.
-- Every counter still changes under the account's row lock only: exact under concurrency.

ALTER TABLE accounts
    ADD COLUMN guards_set               boolean NOT NULL DEFAULT false,
    ADD COLUMN daily_spend_cap          bigint CHECK (daily_spend_cap >= 0),
    ADD COLUMN allowed_countries        text[] CHECK (allowed_countries IS NULL OR
                                                      array_to_string(allowed_countries, ',')
                                                          ~ '^([A-Z]{2}(,[A-Z]{2})*)?$'),
    ADD COLUMN max_credits_per_message  bigint CHECK (max_credits_per_message > 0),
    ADD COLUMN velocity_window_seconds  integer CHECK (velocity_window_seconds > 0),
    ADD COLUMN velocity_multiple        numeric CHECK (velocity_multiple > 0),
    ADD COLUMN velocity_min_credits     bigint NOT NULL DEFAULT 100
                                        CHECK (velocity_min_credits >= 0),
    ADD COLUMN transactional_reserve    bigint NOT NULL DEFAULT 0
                                        CHECK (transactional_reserve >= 0),
    ADD COLUMN transactional_overdraft  bigint NOT NULL DEFAULT 0
                                        CHECK (transactional_overdraft >= 0),
    -- Guard state, changed under the account's lock only.
    ADD COLUMN spent_day                date,
    ADD COLUMN spent_today              bigint NOT NULL DEFAULT 0,
    ADD COLUMN capped_until             timestamptz,
    ADD COLUMN window_start             timestamptz,
    ADD COLUMN window_spent             bigint NOT NULL DEFAULT 0,
    ADD COLUMN usual_per_window         numeric NOT NULL DEFAULT 0,
    ADD COLUMN velocity_held_at         timestamptz,
    ADD COLUMN guards_updated_at        timestamptz,
    ADD CONSTRAINT accounts_velocity_guard_pair
        CHECK ((velocity_window_seconds IS NULL) = (velocity_multiple IS NULL));

-- The data: settings and counters as they stand (no cap history row: nothing changed).
UPDATE accounts a
   SET guards_set = true, daily_spend_cap = g.daily_spend_cap,
       allowed_countries = g.allowed_countries,
       max_credits_per_message = g.max_credits_per_message,
       velocity_window_seconds = g.velocity_window_seconds,
       velocity_multiple = g.velocity_multiple, velocity_min_credits = g.velocity_min_credits,
       transactional_reserve = g.transactional_reserve,
       transactional_overdraft = g.transactional_overdraft,
       spent_day = g.spent_day, spent_today = g.spent_today, capped_until = g.capped_until,
       window_start = g.window_start, window_spent = g.window_spent,
       usual_per_window = g.usual_per_window, velocity_held_at = g.velocity_held_at,
       guards_updated_at = g.updated_at
  FROM account_guards g
 WHERE g.account_id = a.id;

DROP FUNCTION guard_settings_set(text, bigint, text[], bigint, integer, numeric, bigint, bigint,
                                 bigint);
DROP TABLE account_guards;  -- and its cap-history triggers
DROP FUNCTION guard_cap_changed();

CREATE VIEW account_guards AS
SELECT id AS account_id, daily_spend_cap, allowed_countries, max_credits_per_message,
       velocity_window_seconds, velocity_multiple, velocity_min_credits, transactional_reserve,
       transactional_overdraft, spent_day, spent_today, capped_until, window_start, window_spent,
       usual_per_window, velocity_held_at, guards_updated_at AS updated_at
  FROM accounts
 WHERE guards_set;

-- guard_cap_history, as 0023's triggers kept it: when the guards are first set, a "no cap" row
-- (0023 inserted the account_guards row, then set its cap: the day's spend before is bound by
-- no cap), then the cap if one is set, and every change after. A reservation's UPDATE lists
-- neither column: it never fires.
CREATE FUNCTION guard_cap_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT OLD.guards_set THEN
        INSERT INTO guard_cap_history (account_id, daily_spend_cap) VALUES (NEW.id, NULL);
    END IF;
    IF OLD.guards_set OR NEW.daily_spend_cap IS NOT NULL THEN
        INSERT INTO guard_cap_history (account_id, daily_spend_cap)
        VALUES (NEW.id, NEW.daily_spend_cap);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_guard_cap_changed AFTER UPDATE OF daily_spend_cap, guards_set ON accounts
    FOR EACH ROW
    WHEN (NEW.guards_set AND (NOT OLD.guards_set
                              OR OLD.daily_spend_cap IS DISTINCT FROM NEW.daily_spend_cap))
    EXECUTE FUNCTION guard_cap_changed();


-- As in 0023, on the accounts row (the same answers, events and wake-ups).
CREATE FUNCTION guard_settings_set(
    p_account text, p_daily_spend_cap bigint, p_allowed_countries text[],
    p_max_credits_per_message bigint, p_velocity_window_seconds integer,
    p_velocity_multiple numeric, p_velocity_min_credits bigint, p_transactional_reserve bigint,
    p_transactional_overdraft bigint
) RETURNS SETOF account_guards LANGUAGE plpgsql AS $$
DECLARE
    a accounts%ROWTYPE;
    today date := (now() AT TIME ZONE 'UTC')::date;
    today_start timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    spent bigint;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- From the ledger every time: the counter is not kept while no cap is set.
    spent := (SELECT coalesce(sum(l.amount), 0) FROM ledger l
               WHERE l.account_id = p_account AND l.kind = 'reserve'
                 AND l.created_at >= today_start);
    UPDATE accounts x
       SET guards_set = true,
           daily_spend_cap = p_daily_spend_cap, allowed_countries = p_allowed_countries,
           max_credits_per_message = p_max_credits_per_message,
           velocity_window_seconds = p_velocity_window_seconds,
           velocity_multiple = p_velocity_multiple,
           velocity_min_credits = coalesce(p_velocity_min_credits, 100),
           transactional_reserve = coalesce(p_transactional_reserve, 0),
           transactional_overdraft = coalesce(p_transactional_overdraft, 0),
           spent_day = today, spent_today = spent,
           capped_until = CASE WHEN p_daily_spend_cap IS NULL
                                    OR p_daily_spend_cap > spent THEN NULL
                               ELSE x.capped_until END,
           velocity_held_at = CASE WHEN p_velocity_window_seconds IS NULL THEN NULL
                                   ELSE x.velocity_held_at END,
           -- A velocity guard turned on starts its first window now.
           window_start = CASE WHEN x.velocity_window_seconds IS NULL THEN NULL
                               ELSE x.window_start END,
           window_spent = CASE WHEN x.velocity_window_seconds IS NULL THEN 0
                               ELSE x.window_spent END,
           guards_updated_at = now()
     WHERE x.id = p_account;
    IF a.capped_until IS NOT NULL AND (p_daily_spend_cap IS NULL
                                       OR p_daily_spend_cap > spent) THEN
        PERFORM emit_account_event(p_account, 'uncapped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', p_daily_spend_cap,
            'spent_today', spent));
        PERFORM pg_notify('dispatcher_resume', p_account);
    END IF;
    IF a.velocity_held_at IS NOT NULL AND p_velocity_window_seconds IS NULL THEN
        PERFORM emit_account_event(p_account, 'velocity_released',
                                   jsonb_build_object('reason', 'velocity'));
        PERFORM pg_notify('dispatcher_resume', p_account);
    END IF;
    RETURN QUERY SELECT * FROM account_guards g WHERE g.account_id = p_account;
END $$;


-- As in 0023, on the accounts row.
CREATE OR REPLACE FUNCTION guard_release_velocity(p_account text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    UPDATE accounts
       SET velocity_held_at = NULL, window_start = now(), window_spent = 0,
           guards_updated_at = now()
     WHERE id = p_account AND guards_set AND velocity_held_at IS NOT NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM emit_account_event(p_account, 'velocity_released',
                               jsonb_build_object('reason', 'velocity'));
    PERFORM pg_notify('dispatcher_resume', p_account);
    RETURN true;
END $$;


-- As in 0023, on the accounts row.
CREATE OR REPLACE FUNCTION guard_transactional_passes(p_account text, p_priority text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT p_priority = 'transactional' AND EXISTS (
        SELECT 1 FROM accounts a
         WHERE a.id = p_account AND a.guards_set
           AND (a.transactional_reserve > 0 OR a.transactional_overdraft > 0))
$$;


-- reserve_one's body (0028), for an account row the caller has locked (`acct`, read after the
-- lock). With p_counted, the same UPDATE that takes the credits also writes the guard counters
-- the caller computed (today's spend, the velocity window) plus this reservation: a guarded
-- one-job reservation writes one accounts row version, as an unguarded one does.
CREATE FUNCTION reserve_one_locked(
    acct accounts, p_job_id text, p_amount bigint, p_counted boolean, p_day date,
    p_spent bigint, p_wstart timestamptz, p_wspent bigint, p_usual numeric,
    OUT status text, OUT amount bigint, OUT available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    prior reservations%ROWTYPE;
    avail bigint := acct.sub_available + acct.purchased_available - acct.debt;
    v_sub bigint;
    v_need bigint;
    v_part bigint;
    v_bids bigint[] := '{}';
    v_bparts bigint[] := '{}';
    v_bnegs bigint[] := '{}';
    bk record;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'reserve_batch: amount must be positive, got %', p_amount;
    END IF;
    SELECT * INTO prior FROM reservations r WHERE r.job_id = p_job_id;
    IF FOUND THEN
        status := CASE WHEN prior.account_id = acct.id THEN 'existing' ELSE 'conflict' END;
        amount := prior.amount;
        available := avail;
        RETURN;
    END IF;
    IF p_amount > avail THEN
        status := 'insufficient';
        amount := p_amount;
        available := avail;
        RETURN;
    END IF;
    -- The subscription first, then the buckets oldest first (sub_available >= 0).
    v_sub := LEAST(p_amount, acct.sub_available);
    v_need := p_amount - v_sub;
    IF v_need > 0 THEN
        FOR bk IN SELECT b.id, b.remaining FROM credit_buckets b
                   WHERE b.account_id = acct.id AND b.remaining > 0 ORDER BY b.id LOOP
            v_part := LEAST(v_need, bk.remaining);
            v_bids := v_bids || bk.id;
            v_bparts := v_bparts || v_part;
            v_bnegs := v_bnegs || -v_part;
            UPDATE credit_buckets b SET remaining = b.remaining - v_part WHERE b.id = bk.id;
            v_need := v_need - v_part;
            EXIT WHEN v_need = 0;
        END LOOP;
    END IF;
    -- purchased_available promised credits the buckets do not hold: never a silent partial
    -- take (the same check, and message, as reserve_batch_set's).
    PERFORM ledger_check(v_need = 0, 'credits_take: insufficient credits for ' || acct.id);
    INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq, bucket_ids,
                              bucket_parts)
    VALUES (p_job_id, acct.id, p_amount, v_sub, acct.period_seq, v_bids, v_bparts);
    INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, reserved_delta,
                        bucket_ids, bucket_deltas, amount, job_id)
    VALUES (acct.id, 'reserve', 'reserve:' || p_job_id, -v_sub, -(p_amount - v_sub),
            p_amount, v_bids, v_bnegs, p_amount, p_job_id);
    IF p_counted THEN
        UPDATE accounts a
           SET sub_available = a.sub_available - v_sub,
               purchased_available = a.purchased_available - (p_amount - v_sub),
               reserved = a.reserved + p_amount,
               spent_day = p_day, spent_today = p_spent + p_amount, window_start = p_wstart,
               window_spent = p_wspent + p_amount, usual_per_window = p_usual
         WHERE a.id = acct.id;
    ELSE
        UPDATE accounts a
           SET sub_available = a.sub_available - v_sub,
               purchased_available = a.purchased_available - (p_amount - v_sub),
               reserved = a.reserved + p_amount
         WHERE a.id = acct.id;
    END IF;
    status := 'reserved';
    amount := p_amount;
    available := avail - p_amount;
END $$;

-- As in 0028: the same answers and rows, its body now reserve_one_locked's.
CREATE OR REPLACE FUNCTION reserve_one(p_account text, p_job_id text, p_amount bigint)
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    r record;
BEGIN
    SELECT * INTO acct FROM accounts a WHERE a.id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT p_job_id, 'unknown_account'::text, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO r FROM reserve_one_locked(acct, p_job_id, p_amount, false, NULL, NULL, NULL,
                                            NULL, NULL);
    job_id := p_job_id;
    status := r.status;
    amount := r.amount;
    available := r.available;
    RETURN NEXT;
END $$;


-- As in 0023 (same statuses, counters and events), the guards read from the locked accounts
-- row. The edits, marked "0031":
--   * no account_guards row to read: `acct.guards_set` is the test for "no guards";
--   * one job (guarded or not) is reserved by reserve_one_locked on the row already read; when
--     it passes every guard, its counters are written by the reservation's own UPDATE;
--   * the other counter updates go to the accounts row.
CREATE OR REPLACE FUNCTION reserve_guarded(p_account text, p_priorities text[], p_job_ids text[],
                                           p_amounts bigint[], p_countries text[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    n integer := coalesce(array_length(p_job_ids, 1), 0);
    today date;
    avail bigint;
    spent bigint;
    wspent bigint := 0;
    usual numeric;
    wstart timestamptz;
    threshold numeric;
    elapsed integer;
    verdicts text[];
    ok_ids text[] := '{}';
    ok_amts bigint[] := '{}';
    res_status text[] := '{}';
    res_amount bigint[] := '{}';
    res_avail bigint[] := '{}';
    cum bigint := 0;
    capped boolean;
    vheld boolean;
    short boolean := false;
    overdrawn boolean := false;
    was_capped boolean;
    counting boolean;
    reserved_sum bigint := 0;
    bulk boolean;
    v text;
    r record;
    i integer;
    k integer := 0;
BEGIN
    SELECT * INTO acct FROM accounts a WHERE a.id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT * FROM reserve_batch(p_account, p_job_ids, p_amounts);
        RETURN;
    END IF;
    IF NOT acct.guards_set THEN  -- 0031: no guards, the reservation as before
        IF n = 1 AND cardinality(p_amounts) = 1 THEN
            SELECT * INTO r FROM reserve_one_locked(
                acct, p_job_ids[array_lower(p_job_ids, 1)],
                p_amounts[array_lower(p_amounts, 1)], false, NULL, NULL, NULL, NULL, NULL);
            job_id := p_job_ids[array_lower(p_job_ids, 1)];
            status := r.status;
            amount := r.amount;
            available := r.available;
            RETURN NEXT;
        ELSE
            RETURN QUERY SELECT * FROM reserve_batch(p_account, p_job_ids, p_amounts);
        END IF;
        RETURN;
    END IF;
    today := (now() AT TIME ZONE 'UTC')::date;
    avail := acct.sub_available + acct.purchased_available - acct.debt;
    spent := CASE WHEN acct.spent_day = today THEN acct.spent_today ELSE 0 END;
    counting := acct.daily_spend_cap IS NOT NULL OR acct.velocity_window_seconds IS NOT NULL;
    -- A cap ends when its day does (the next reservation, or the resumer's sweep, sees it).
    was_capped := acct.capped_until IS NOT NULL;
    -- A transaction whose now() is older than the counter's day (it waited for the lock
    -- across midnight) cannot know what its own day spent: it holds, the sweep releases.
    capped := (acct.capped_until IS NOT NULL AND acct.capped_until > now())
              OR coalesce(acct.spent_day > today, false);
    vheld := acct.velocity_held_at IS NOT NULL;
    usual := acct.usual_per_window;
    wstart := acct.window_start;
    IF acct.velocity_window_seconds IS NOT NULL THEN
        IF wstart IS NULL THEN
            wstart := now();
        ELSE
            elapsed := floor(extract(epoch FROM now() - wstart) / acct.velocity_window_seconds);
            IF elapsed >= 1 THEN
                usual := (0.9 * usual + 0.1 * acct.window_spent)
                         * power(0.9, LEAST(elapsed - 1, 500));
                wstart := wstart + make_interval(secs => elapsed * acct.velocity_window_seconds);
            ELSE
                wspent := acct.window_spent;
            END IF;
        END IF;
        threshold := greatest(acct.velocity_multiple * usual, acct.velocity_min_credits);
    END IF;
    verdicts := array_fill(NULL::text, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        bulk := p_priorities[i] IS DISTINCT FROM 'transactional';
        v := NULL;
        IF acct.allowed_countries IS NOT NULL
           AND (p_countries[i] IS NULL OR NOT p_countries[i] = ANY(acct.allowed_countries)) THEN
            v := 'country_not_allowed';
        ELSIF p_amounts[i] > acct.max_credits_per_message THEN
            v := 'price_above_limit';
        ELSIF capped OR spent + cum + p_amounts[i] > acct.daily_spend_cap THEN
            v := 'daily_cap';
            capped := true;
        ELSIF bulk AND (vheld OR wspent + cum + p_amounts[i] > threshold) THEN
            v := 'velocity';
            vheld := true;
        ELSIF bulk AND (short OR avail - cum - p_amounts[i] < acct.transactional_reserve) THEN
            v := 'insufficient';
            short := true;
        ELSIF NOT bulk AND (overdrawn OR avail - cum - p_amounts[i] < 0)
              AND avail - cum - p_amounts[i] >= -acct.transactional_overdraft THEN
            -- Reserved after the others (reserve_overdraft), in order: they come last anyway.
            v := 'overdraft';
            overdrawn := true;
            cum := cum + p_amounts[i];
        END IF;
        IF v IS NULL THEN
            ok_ids := ok_ids || p_job_ids[i];
            ok_amts := ok_amts || p_amounts[i];
            cum := cum + p_amounts[i];
        END IF;
        verdicts[i] := v;
    END LOOP;
    IF cardinality(ok_ids) = n AND NOT was_capped AND acct.velocity_held_at IS NULL THEN
        -- Every job passed every guard (the usual case).
        IF n = 1 THEN
            -- 0031: one job, its counters in the reservation's own UPDATE.
            SELECT * INTO r FROM reserve_one_locked(acct, ok_ids[1], ok_amts[1], counting,
                                                    today, spent, wstart, wspent, usual);
            job_id := ok_ids[1];
            status := r.status;
            amount := r.amount;
            available := r.available;
            RETURN NEXT;
            RETURN;
        END IF;
        RETURN QUERY SELECT * FROM reserve_batch(p_account, p_job_ids, p_amounts);
        IF counting THEN
            -- 0031: the accounts row (locked), once per batch. What this call reserved is what
            -- `reserved` grew by: nothing else changes it while the lock is held.
            UPDATE accounts x
               SET spent_day = today, spent_today = spent + (x.reserved - acct.reserved),
                   window_start = wstart, window_spent = wspent + (x.reserved - acct.reserved),
                   usual_per_window = usual
             WHERE x.id = p_account;
        END IF;
        RETURN;
    END IF;
    IF cardinality(ok_ids) > 0 THEN
        FOR r IN SELECT * FROM reserve_batch(p_account, ok_ids, ok_amts) LOOP
            res_status := res_status || r.status;
            res_amount := res_amount || r.amount;
            res_avail := res_avail || r.available;
            IF r.status = 'reserved' THEN
                reserved_sum := reserved_sum + r.amount;
            END IF;
        END LOOP;
    END IF;
    FOR i IN 1 .. n LOOP  -- transactional jobs into the overdraft, after the rest
        CONTINUE WHEN verdicts[i] IS DISTINCT FROM 'overdraft';
        verdicts[i] := reserve_overdraft(p_account, p_job_ids[i], p_amounts[i]);
        IF verdicts[i] = 'reserved' THEN
            reserved_sum := reserved_sum + p_amounts[i];
        END IF;
    END LOOP;
    -- The counters: only the daily cap and the velocity guard need them.
    UPDATE accounts x  -- 0031: was account_guards
       SET spent_day = today, spent_today = spent + reserved_sum,
           window_start = wstart, window_spent = wspent + reserved_sum,
           usual_per_window = usual,
           capped_until = CASE WHEN capped THEN guard_next_utc_day(now()) END,
           velocity_held_at = CASE WHEN vheld THEN coalesce(x.velocity_held_at, now()) END
     WHERE x.id = p_account
       AND (counting OR was_capped OR vheld OR acct.velocity_held_at IS NOT NULL);
    IF was_capped AND NOT capped THEN
        PERFORM emit_account_event(p_account, 'uncapped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', acct.daily_spend_cap,
            'spent_today', spent + reserved_sum));
    ELSIF capped AND (acct.capped_until IS NULL OR acct.capped_until <= now()) THEN
        PERFORM emit_account_event(p_account, 'capped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', acct.daily_spend_cap,
            'spent_today', spent + reserved_sum,
            'until', to_char(guard_next_utc_day(now()) AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS"Z"')));
    END IF;
    IF vheld AND acct.velocity_held_at IS NULL THEN
        PERFORM emit_account_event(p_account, 'velocity_held', jsonb_build_object(
            'reason', 'velocity', 'window_seconds', acct.velocity_window_seconds,
            'window_spent', wspent + reserved_sum, 'threshold', floor(threshold),
            'usual_per_window', round(usual, 2), 'multiple', acct.velocity_multiple));
    END IF;
    FOR i IN 1 .. n LOOP
        job_id := p_job_ids[i];
        IF verdicts[i] IS NULL THEN
            k := k + 1;
            status := res_status[k];
            amount := res_amount[k];
            available := res_avail[k];
            avail := res_avail[k];
        ELSE
            status := verdicts[i];
            amount := p_amounts[i];
            IF status = 'reserved' THEN  -- into the overdraft
                avail := avail - p_amounts[i];
            END IF;
            available := avail;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
