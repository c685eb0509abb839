-- Spend guards (issue 17, part 1), enforced inside the reservation's transaction.
--
-- Per account, all optional (no row in account_guards: no guard, the reservation as before):
--   daily_spend_cap          credits reserved per UTC day (00:00-24:00 UTC, whatever the
--                            account's time zone). A job that would pass it is held with reason
--                            `daily_cap` until the next UTC day starts; account.capped /
--                            account.uncapped events.
--   allowed_countries        ISO 3166-1 alpha-2 codes; NULL = every country. A job to another
--                            country (or one whose country is unknown) is refused with
--                            `country_not_allowed`: dead-lettered, or a skipped recipient.
--   max_credits_per_message  a message priced above it is refused with `price_above_limit`.
--   velocity_*               when the credits reserved in the current window (tumbling,
--                            velocity_window_seconds long) would pass
--                            max(velocity_multiple x usual, velocity_min_credits), where `usual`
--                            is a moving average of the credits per window (weight 0.1 per
--                            window, quiet windows counting 0), the account's BULK sending is
--                            held with reason `velocity` (account.velocity_held) until an owner
--                            releases it (guard_release_velocity, account.velocity_released).
--   transactional_reserve    bulk work may not spend the last N credits: it stops at the floor
--                            exactly as at zero (held, account paused, billing asked for a top-up,
--                            resumed when credits arrive); transactional jobs may use them, and
--                            get past a pause that bulk work caused.
--   transactional_overdraft  transactional jobs may also go below zero, down to -N: the part of
--                            such a reservation beyond the credits is debt (reservations.debt_part),
--                            given back first when the send fails or costs less.
-- Every reservation path (begin_job, begin_broadcast_batch, release_held) goes through
-- reserve_guarded, which locks the account row first (as reserve_batch does), so concurrent
-- replicas serialise on it and a cap can never be passed, not by one credit.
-- The daily counter counts credits reserved that day (a reservation given back later, a failed
-- send, still counted: the cap bounds what could have been spent); guard_cap_history keeps every
-- cap ever set, so `dispatcher audit` can check the ledger against the cap in force.

CREATE TABLE account_guards (
    account_id               text PRIMARY KEY REFERENCES accounts (id),
    daily_spend_cap          bigint CHECK (daily_spend_cap >= 0),
    allowed_countries        text[] CHECK (allowed_countries IS NULL OR
                                           array_to_string(allowed_countries, ',')
                                               ~ '^([A-Z]{2}(,[A-Z]{2})*)?$'),
    max_credits_per_message  bigint CHECK (max_credits_per_message > 0),
    velocity_window_seconds  integer CHECK (velocity_window_seconds > 0),
    velocity_multiple        numeric CHECK (velocity_multiple > 0),
    velocity_min_credits     bigint NOT NULL DEFAULT 100 CHECK (velocity_min_credits >= 0),
    transactional_reserve    bigint NOT NULL DEFAULT 0 CHECK (transactional_reserve >= 0),
    transactional_overdraft  bigint NOT NULL DEFAULT 0 CHECK (transactional_overdraft >= 0),
    -- State, changed under the account's lock only.
    spent_day                date,
    spent_today              bigint NOT NULL DEFAULT 0,
    capped_until             timestamptz,
    window_start             timestamptz,
    window_spent             bigint NOT NULL DEFAULT 0,
    usual_per_window         numeric NOT NULL DEFAULT 0,
    velocity_held_at         timestamptz,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CHECK ((velocity_window_seconds IS NULL) = (velocity_multiple IS NULL))
) WITH (fillfactor = 50);  -- room for HOT updates: the counters change on every reservation

CREATE TABLE guard_cap_history (
    id               bigserial PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    daily_spend_cap  bigint,  -- NULL: no cap from then on
    set_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX guard_cap_history_account ON guard_cap_history (account_id, set_at);

CREATE FUNCTION guard_cap_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.daily_spend_cap IS DISTINCT FROM NEW.daily_spend_cap THEN
        INSERT INTO guard_cap_history (account_id, daily_spend_cap)
        VALUES (NEW.account_id, NEW.daily_spend_cap);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER account_guards_cap_set AFTER INSERT ON account_guards
    FOR EACH ROW EXECUTE FUNCTION guard_cap_changed();
CREATE TRIGGER account_guards_cap_changed AFTER UPDATE OF daily_spend_cap ON account_guards
    FOR EACH ROW WHEN (OLD.daily_spend_cap IS DISTINCT FROM NEW.daily_spend_cap)
    EXECUTE FUNCTION guard_cap_changed();

-- Held jobs waiting for a guard, for the resumer's sweep.
CREATE INDEX jobs_guard_held ON jobs (account_id) WHERE status = 'held'
    AND reason IN ('daily_cap', 'velocity');


-- An account.* event on the events exchange.
CREATE FUNCTION emit_account_event(p_account text, p_status text, p_details jsonb)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, exchange, routing_key, body)
    SELECT e.id, 'events', 'account.' || p_status, jsonb_build_object(
        'schema_version', 1, 'event_id', e.id, 'account', p_account, 'status', p_status,
        'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || p_details
      FROM (SELECT gen_random_uuid() AS id) e
$$;


-- The start of the next UTC day.
CREATE FUNCTION guard_next_utc_day(p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT (date_trunc('day', p_at AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
$$;


-- Set an account's guards (all of them: a NULL turns one off). Called by the API and the CLI.
-- Today's counter starts from the ledger, so a cap set mid-day counts what today already spent;
-- a change lifts a current cap or velocity hold only if the new settings no longer impose it
-- (a cap is re-imposed by the next reservation that would pass it).
CREATE FUNCTION guard_settings_set(
    p_account text, p_daily_spend_cap bigint, p_allowed_countries text[],
    p_max_credits_per_message bigint, p_velocity_window_seconds integer,
    p_velocity_multiple numeric, p_velocity_min_credits bigint, p_transactional_reserve bigint,
    p_transactional_overdraft bigint
) RETURNS SETOF account_guards LANGUAGE plpgsql AS $$
DECLARE
    g account_guards%ROWTYPE;
    today_start timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO account_guards (account_id) VALUES (p_account) ON CONFLICT DO NOTHING;
    SELECT * INTO g FROM account_guards WHERE account_id = p_account;
    -- From the ledger every time: the counter is not kept while no cap is set.
    g.spent_day := (now() AT TIME ZONE 'UTC')::date;
    g.spent_today := (SELECT coalesce(sum(l.amount), 0) FROM ledger l
                       WHERE l.account_id = p_account AND l.kind = 'reserve'
                         AND l.created_at >= today_start);
    UPDATE account_guards a
       SET daily_spend_cap = p_daily_spend_cap, allowed_countries = p_allowed_countries,
           max_credits_per_message = p_max_credits_per_message,
           velocity_window_seconds = p_velocity_window_seconds,
           velocity_multiple = p_velocity_multiple,
           velocity_min_credits = coalesce(p_velocity_min_credits, 100),
           transactional_reserve = coalesce(p_transactional_reserve, 0),
           transactional_overdraft = coalesce(p_transactional_overdraft, 0),
           spent_day = g.spent_day, spent_today = g.spent_today,
           capped_until = CASE WHEN p_daily_spend_cap IS NULL
                                    OR p_daily_spend_cap > g.spent_today THEN NULL
                               ELSE a.capped_until END,
           velocity_held_at = CASE WHEN p_velocity_window_seconds IS NULL THEN NULL
                                   ELSE a.velocity_held_at END,
           -- A velocity guard turned on starts its first window now.
           window_start = CASE WHEN a.velocity_window_seconds IS NULL THEN NULL
                               ELSE a.window_start END,
           window_spent = CASE WHEN a.velocity_window_seconds IS NULL THEN 0
                               ELSE a.window_spent END,
           updated_at = now()
     WHERE a.account_id = p_account;
    IF g.capped_until IS NOT NULL AND (p_daily_spend_cap IS NULL
                                       OR p_daily_spend_cap > g.spent_today) THEN
        PERFORM emit_account_event(p_account, 'uncapped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', p_daily_spend_cap,
            'spent_today', g.spent_today));
        PERFORM pg_notify('dispatcher_resume', p_account);
    END IF;
    IF g.velocity_held_at IS NOT NULL AND p_velocity_window_seconds IS NULL THEN
        PERFORM emit_account_event(p_account, 'velocity_released',
                                   jsonb_build_object('reason', 'velocity'));
        PERFORM pg_notify('dispatcher_resume', p_account);
    END IF;
    RETURN QUERY SELECT * FROM account_guards WHERE account_id = p_account;
END $$;


-- An owner lets held bulk sending go on: the hold ends, the window starts afresh, the resumer
-- is woken for the held jobs. False when the account was not held.
CREATE FUNCTION guard_release_velocity(p_account text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    UPDATE account_guards
       SET velocity_held_at = NULL, window_start = now(), window_spent = 0, updated_at = now()
     WHERE account_id = p_account AND velocity_held_at IS NOT NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM emit_account_event(p_account, 'velocity_released',
                               jsonb_build_object('reason', 'velocity'));
    PERFORM pg_notify('dispatcher_resume', p_account);
    RETURN true;
END $$;


-- Whether a transactional job may go past an account's pause: the account keeps a reserve for
-- transactional work, so the pause may have been bulk work reaching the floor.
CREATE FUNCTION guard_transactional_passes(p_account text, p_priority text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_priority = 'transactional' AND EXISTS (
        SELECT 1 FROM account_guards g
         WHERE g.account_id = p_account
           AND (g.transactional_reserve > 0 OR g.transactional_overdraft > 0))
$$;


-- reserve_batch behind the account's guards. Same rows as reserve_batch, plus these statuses:
--   country_not_allowed, price_above_limit  refused (nothing reserved; later jobs go on)
--   daily_cap                               not reserved, nor any later job of the batch
--   velocity                                a bulk job not reserved, nor any later bulk one
--   insufficient                            also: a bulk job that would cross the reserve floor
-- A transactional job past the credits but within the overdraft is reserved (reserve_overdraft,
-- after the batch's others). Transactional jobs go on past held bulk ones. An existing reservation counts toward the
-- guards' sums here as if new (conservative: it can only hold a job sooner).
CREATE FUNCTION reserve_guarded(p_account text, p_priorities text[], p_job_ids text[],
                                p_amounts bigint[], p_countries text[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    g account_guards%ROWTYPE;
    n integer := coalesce(array_length(p_job_ids, 1), 0);
    today date := (now() AT TIME ZONE 'UTC')::date;
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
    reserved_sum bigint := 0;
    bulk boolean;
    v text;
    r record;
    i integer;
    k integer := 0;
BEGIN
    SELECT * INTO acct FROM accounts a WHERE a.id = p_account FOR UPDATE;
    IF FOUND THEN
        SELECT * INTO g FROM account_guards x WHERE x.account_id = p_account;
    END IF;
    IF NOT FOUND THEN  -- no account, or no guards: the reservation as before
        RETURN QUERY SELECT * FROM reserve_batch(p_account, p_job_ids, p_amounts);
        RETURN;
    END IF;
    avail := acct.sub_available + acct.purchased_available - acct.debt;
    spent := CASE WHEN g.spent_day = today THEN g.spent_today ELSE 0 END;
    -- A cap ends when its day does (the next reservation, or the resumer's sweep, sees it).
    was_capped := g.capped_until IS NOT NULL;
    -- A transaction whose now() is older than the counter's day (it waited for the lock
    -- across midnight) cannot know what its own day spent: it holds, the sweep releases.
    capped := (g.capped_until IS NOT NULL AND g.capped_until > now())
              OR coalesce(g.spent_day > today, false);
    vheld := g.velocity_held_at IS NOT NULL;
    usual := g.usual_per_window;
    wstart := g.window_start;
    IF g.velocity_window_seconds IS NOT NULL THEN
        IF wstart IS NULL THEN
            wstart := now();
        ELSE
            elapsed := floor(extract(epoch FROM now() - wstart) / g.velocity_window_seconds);
            IF elapsed >= 1 THEN
                usual := (0.9 * usual + 0.1 * g.window_spent) * power(0.9, LEAST(elapsed - 1, 500));
                wstart := wstart + make_interval(secs => elapsed * g.velocity_window_seconds);
            ELSE
                wspent := g.window_spent;
            END IF;
        END IF;
        threshold := greatest(g.velocity_multiple * usual, g.velocity_min_credits);
    END IF;
    verdicts := array_fill(NULL::text, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        bulk := p_priorities[i] IS DISTINCT FROM 'transactional';
        v := NULL;
        IF g.allowed_countries IS NOT NULL
           AND (p_countries[i] IS NULL OR NOT p_countries[i] = ANY(g.allowed_countries)) THEN
            v := 'country_not_allowed';
        ELSIF p_amounts[i] > g.max_credits_per_message THEN
            v := 'price_above_limit';
        ELSIF capped OR spent + cum + p_amounts[i] > g.daily_spend_cap THEN
            v := 'daily_cap';
            capped := true;
        ELSIF bulk AND (vheld OR wspent + cum + p_amounts[i] > threshold) THEN
            v := 'velocity';
            vheld := true;
        ELSIF bulk AND (short OR avail - cum - p_amounts[i] < g.transactional_reserve) THEN
            v := 'insufficient';
            short := true;
        ELSIF NOT bulk AND (overdrawn OR avail - cum - p_amounts[i] < 0)
              AND avail - cum - p_amounts[i] >= -g.transactional_overdraft THEN
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
    IF cardinality(ok_ids) = n AND NOT was_capped AND g.velocity_held_at IS NULL THEN
        -- Every job passed every guard (the usual case): one statement reserves them and
        -- counts what was reserved.
        RETURN QUERY
        WITH rb AS (SELECT * FROM reserve_batch(p_account, p_job_ids, p_amounts)),
        counted AS (
            UPDATE account_guards x
               SET spent_day = today,
                   spent_today = spent + t.total, window_start = wstart,
                   window_spent = wspent + t.total, usual_per_window = usual
              FROM (SELECT coalesce(sum(rb.amount) FILTER (WHERE rb.status = 'reserved'), 0)
                           AS total FROM rb) t
             WHERE x.account_id = p_account
               AND (g.daily_spend_cap IS NOT NULL OR g.velocity_window_seconds IS NOT NULL))
        SELECT * FROM rb;
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
    UPDATE account_guards x
       SET spent_day = today, spent_today = spent + reserved_sum,
           window_start = wstart, window_spent = wspent + reserved_sum,
           usual_per_window = usual,
           capped_until = CASE WHEN capped THEN guard_next_utc_day(now()) END,
           velocity_held_at = CASE WHEN vheld THEN coalesce(x.velocity_held_at, now()) END
     WHERE x.account_id = p_account
       AND (g.daily_spend_cap IS NOT NULL OR g.velocity_window_seconds IS NOT NULL
            OR was_capped OR vheld OR g.velocity_held_at IS NOT NULL);
    IF was_capped AND NOT capped THEN
        PERFORM emit_account_event(p_account, 'uncapped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', g.daily_spend_cap,
            'spent_today', spent + reserved_sum));
    ELSIF capped AND (g.capped_until IS NULL OR g.capped_until <= now()) THEN
        PERFORM emit_account_event(p_account, 'capped', jsonb_build_object(
            'reason', 'daily_cap', 'daily_spend_cap', g.daily_spend_cap,
            'spent_today', spent + reserved_sum,
            'until', to_char(guard_next_utc_day(now()) AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS"Z"')));
    END IF;
    IF vheld AND g.velocity_held_at IS NULL THEN
        PERFORM emit_account_event(p_account, 'velocity_held', jsonb_build_object(
            'reason', 'velocity', 'window_seconds', g.velocity_window_seconds,
            'window_spent', wspent + reserved_sum, 'threshold', floor(threshold),
            'usual_per_window', round(usual, 2), 'multiple', g.velocity_multiple));
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


-- Hold a job for a guard (`daily_cap`, `velocity`), in arrival order like hold_job.
CREATE FUNCTION guard_hold_job(p_job jobs, p_reason text) RETURNS jobs
LANGUAGE plpgsql AS $$
DECLARE
    held jobs;
BEGIN
    p_job.status := 'held';
    p_job.hold_seq := nextval('job_hold_seq');
    p_job.attempts := 0;
    p_job.reason := p_reason;
    INSERT INTO jobs SELECT p_job.* RETURNING * INTO held;
    PERFORM emit_job_event(held, 'held', p_reason);
    RETURN held;
END $$;


-- As in 0022, with the spend guards (issue 17). The edits, marked "0023":
--   * a transactional job passes the account's pause when it keeps a transactional reserve;
--   * reserve_guarded replaces reserve_batch;
--   * its verdicts: country_not_allowed / price_above_limit are outcomes of their own (the
--     caller dead-letters the job, nothing was reserved), daily_cap / velocity hold the job.
CREATE OR REPLACE FUNCTION begin_job(
    p_job_id text, p_account text, p_kind text, p_priority text, p_payload jsonb,
    p_estimate bigint, p_country text, p_units integer, p_rate bigint, p_broadcast_id text
) RETURNS TABLE (outcome text, status text, attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    existing jobs%ROWTYPE;
    candidate jobs%ROWTYPE;
    reserved text;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, NULL::text, 0;
        RETURN;
    END IF;
    SELECT * INTO existing FROM jobs j WHERE j.job_id = p_job_id FOR UPDATE;
    IF FOUND THEN
        IF existing.account_id <> p_account
           OR existing.payload - 'created_at' IS DISTINCT FROM p_payload - 'created_at' THEN
            RETURN QUERY SELECT 'conflict'::text, existing.status, existing.attempts;
        ELSIF existing.status = 'retry_wait' THEN
            UPDATE jobs j SET status = 'sending', attempts = j.attempts + 1, updated_at = now(),
                              sending_at = now(), retry_at = NULL
             WHERE j.job_id = p_job_id;
            RETURN QUERY SELECT 'send'::text, 'sending'::text, existing.attempts + 1;
        ELSE
            RETURN QUERY SELECT 'duplicate'::text, existing.status, existing.attempts;
        END IF;
        RETURN;
    END IF;
    candidate.job_id := p_job_id;
    candidate.account_id := p_account;
    candidate.kind := p_kind;
    candidate.priority := p_priority;
    candidate.status := 'sending';
    candidate.payload := p_payload;
    candidate.estimate := p_estimate;
    candidate.country := p_country;
    candidate.units := p_units;
    candidate.rate := p_rate;
    candidate.broadcast_id := p_broadcast_id;
    candidate.attempts := 1;
    candidate.created_at := now();
    candidate.updated_at := now();
    candidate.sending_at := now();
    IF acct.paused_at IS NOT NULL
       AND NOT guard_transactional_passes(p_account, p_priority) THEN  -- 0023
        PERFORM hold_job(candidate);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    END IF;
    SELECT r.status INTO reserved  -- 0023: reserve_guarded, was reserve_batch
      FROM reserve_guarded(p_account, ARRAY[p_priority], ARRAY[p_job_id], ARRAY[p_estimate],
                           ARRAY[p_country]) r;
    IF reserved IN ('country_not_allowed', 'price_above_limit') THEN  -- 0023
        RETURN QUERY SELECT reserved, NULL::text, 0;
        RETURN;
    ELSIF reserved IN ('daily_cap', 'velocity') THEN  -- 0023
        PERFORM guard_hold_job(candidate, reserved);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    ELSIF reserved = 'insufficient' THEN
        PERFORM hold_job(candidate);
        PERFORM pause_account(p_account);
        RETURN QUERY SELECT 'held'::text, 'held'::text, 0;
        RETURN;
    ELSIF reserved <> 'reserved' THEN
        -- A reservation without a job row: only a foreign job id can cause it.
        RETURN QUERY SELECT 'conflict'::text, NULL::text, 0;
        RETURN;
    END IF;
    INSERT INTO jobs SELECT candidate.*;
    RETURN QUERY SELECT 'send'::text, 'sending'::text, 1;
END $$;


-- As in 0017, with the spend guards (issue 17). The edits, marked "0023":
--   * reserve_guarded replaces reserve_batch (it needs the countries: `countries`);
--   * a recipient refused by a guard (country_not_allowed, price_above_limit) becomes a
--     skipped recipient (never a job, never reserved) with a `skipped` event;
--   * a recipient held by a guard (daily_cap, velocity) is held with that reason.
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
    countries text[];
    reserved text[] := '{}';
    short boolean := false;
    new_sending bigint;
    new_held bigint;
    new_reserved bigint;
    held_ids text[];
    refused text[] := '{}';         -- 0023: refused by a guard, and why
    refused_why text[] := '{}';
    refused_seqs integer[];
    guard_held text[] := '{}';      -- 0023: held by a guard, and why
    guard_why text[] := '{}';
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
    SELECT array_agg(u.job_id ORDER BY u.ord), array_agg(u.estimate ORDER BY u.ord),
           array_agg(u.country ORDER BY u.ord)
      INTO ids, estimates, countries
      FROM unnest(p_seqs, p_job_ids, p_estimates, p_countries)
           WITH ORDINALITY AS u(seq, job_id, estimate, country, ord)
     WHERE u.seq = ANY(live);
    IF ids IS NULL THEN
        RETURN;
    END IF;
    IF acct.paused_at IS NULL
       OR guard_transactional_passes(b.account_id, b.priority) THEN  -- 0023
        SELECT coalesce(array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'), '{}'),
               coalesce(bool_or(r.status = 'insufficient'), false),
               coalesce(array_agg(r.job_id) FILTER (
                   WHERE r.status IN ('country_not_allowed', 'price_above_limit')), '{}'),
               coalesce(array_agg(r.status) FILTER (
                   WHERE r.status IN ('country_not_allowed', 'price_above_limit')), '{}'),
               coalesce(array_agg(r.job_id) FILTER (
                   WHERE r.status IN ('daily_cap', 'velocity')), '{}'),
               coalesce(array_agg(r.status) FILTER (
                   WHERE r.status IN ('daily_cap', 'velocity')), '{}')
          INTO reserved, short, refused, refused_why, guard_held, guard_why
          FROM reserve_guarded(b.account_id, array_fill(b.priority, ARRAY[cardinality(ids)]),
                               ids, estimates, countries) r;  -- 0023
    ELSE
        short := true;
    END IF;
    IF cardinality(refused) > 0 THEN  -- 0023: skipped recipients, never jobs
        WITH s AS (
            UPDATE broadcast_recipients r
               SET status = 'skipped', skip_reason = x.reason
              FROM (SELECT u.seq, g.reason
                      FROM unnest(p_seqs, p_job_ids) AS u(seq, job_id)
                      JOIN unnest(refused, refused_why) AS g(job_id, reason)
                        ON g.job_id = u.job_id) x
             WHERE r.broadcast_id = p_broadcast AND r.seq = x.seq
            RETURNING r.seq)
        SELECT array_agg(s.seq) INTO refused_seqs FROM s;
        UPDATE broadcasts SET skipped = skipped + cardinality(refused_seqs)
         WHERE id = p_broadcast;
        UPDATE broadcast_counts SET pending = pending - cardinality(refused_seqs)
         WHERE broadcast_id = p_broadcast;
        PERFORM emit_recipient_events(p_broadcast, refused_seqs, 'skipped', NULL);
        live := ARRAY(SELECT x FROM unnest(live) AS x EXCEPT SELECT y FROM unnest(refused_seqs) AS y);
    END IF;
    WITH inserted AS (
        INSERT INTO jobs (job_id, account_id, kind, priority, status, payload, estimate,
                          country, units, rate, broadcast_id, hold_seq, attempts, sending_at,
                          reason)
        SELECT u.job_id, b.account_id, 'sms', b.priority,
               CASE WHEN u.job_id = ANY(reserved) THEN 'sending' ELSE 'held' END,
               u.payload, u.estimate, u.country, u.units, u.rate, p_broadcast,
               CASE WHEN u.job_id = ANY(reserved) THEN NULL ELSE nextval('job_hold_seq') END,
               CASE WHEN u.job_id = ANY(reserved) THEN 1 ELSE 0 END,
               CASE WHEN u.job_id = ANY(reserved) THEN now() END,
               (SELECT h.why FROM unnest(guard_held, guard_why) AS h(id, why)
                 WHERE h.id = u.job_id)  -- 0023: the guard's reason, if a guard held it
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
        PERFORM emit_job_event(j, 'held', coalesce(j.reason, 'insufficient_credits'))  -- 0023
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


-- As in 0008, with the spend guards (issue 17). The edits, marked "0023":
--   * it also runs for an account that is not paused but has held jobs (held by a guard);
--   * reserve_guarded replaces reserve_batch (the held jobs' priorities and countries);
--   * a job a guard still holds (daily_cap, velocity) stays held and ends the pass
--     ('still_paused', no balance.depleted); one a guard now refuses fails with its reason;
--   * bulk work that stops at the floor of an account not paused pauses it (as at zero);
--   * released jobs lose the guard's reason; account.resumed only for a paused account.
CREATE OR REPLACE FUNCTION release_held(p_account text, p_limit integer)
RETURNS TABLE (job_id text, payload jsonb, kind text, attempts integer, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    ids text[];
    estimates bigint[];
    priorities text[];         -- 0023
    countries text[];          -- 0023
    released text[];
    short boolean;
    blocked boolean;           -- 0023
    refused text[];            -- 0023
    refused_why text[];        -- 0023
    i integer;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND OR (acct.paused_at IS NULL AND NOT EXISTS (  -- 0023
            SELECT 1 FROM jobs h WHERE h.account_id = p_account AND h.status = 'held')) THEN
        RETURN;
    END IF;
    SELECT array_agg(h.job_id ORDER BY h.hold_seq), array_agg(h.estimate ORDER BY h.hold_seq),
           array_agg(h.priority ORDER BY h.hold_seq), array_agg(h.country ORDER BY h.hold_seq)
      INTO ids, estimates, priorities, countries
      FROM (SELECT j.job_id, j.estimate, j.hold_seq, j.priority, j.country FROM jobs j
             WHERE j.account_id = p_account AND j.status = 'held'
             ORDER BY j.hold_seq LIMIT p_limit) h;
    IF ids IS NULL THEN
        IF acct.paused_at IS NOT NULL THEN  -- 0023
            UPDATE accounts SET paused_at = NULL WHERE id = p_account;
            INSERT INTO outbox (event_id, exchange, routing_key, body)
            SELECT e.id, 'events', 'account.resumed', jsonb_build_object(
                'schema_version', 1, 'event_id', e.id, 'account', p_account,
                'status', 'resumed',
                'occurred_at', to_char(now() AT TIME ZONE 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
              FROM (SELECT gen_random_uuid() AS id) e;
        END IF;
        RETURN QUERY SELECT NULL::text, NULL::jsonb, NULL::text, 0, 'resumed'::text;
        RETURN;
    END IF;
    SELECT array_agg(r.job_id) FILTER (WHERE r.status = 'reserved'),
           bool_or(r.status = 'insufficient'),
           coalesce(bool_or(r.status IN ('daily_cap', 'velocity')), false),
           array_agg(r.job_id) FILTER (
               WHERE r.status IN ('country_not_allowed', 'price_above_limit')),
           array_agg(r.status) FILTER (
               WHERE r.status IN ('country_not_allowed', 'price_above_limit'))
      INTO released, short, blocked, refused, refused_why
      FROM reserve_guarded(p_account, priorities, ids, estimates, countries) r;  -- 0023
    UPDATE jobs j SET status = 'sending', attempts = 1, updated_at = now(), sending_at = now(),
                      reason = NULL  -- 0023
     WHERE j.job_id = ANY(coalesce(released, '{}'));
    FOR i IN 1 .. coalesce(cardinality(refused), 0) LOOP  -- 0023
        PERFORM job_not_sent(refused[i], 'failed', refused_why[i], NULL);
    END LOOP;
    RETURN QUERY
        SELECT j.job_id, j.payload, j.kind, j.attempts, 'released'::text
          FROM jobs j WHERE j.job_id = ANY(coalesce(released, '{}')) ORDER BY j.hold_seq;
    IF short AND acct.paused_at IS NULL THEN  -- 0023: the floor, reached by held bulk work
        PERFORM pause_account(p_account);
    ELSIF short THEN
        IF released IS NULL THEN
            PERFORM emit_still_depleted(p_account);
        END IF;
    END IF;
    IF short OR blocked THEN  -- 0023: or blocked
        RETURN QUERY SELECT NULL::text, NULL::jsonb, NULL::text, 0, 'still_paused'::text;
    END IF;
END $$;


-- The transactional overdraft: reserve one job's credits taking what the account has, then debt
-- for the rest (reservations.debt_part), under the account lock the caller holds. 'reserved',
-- or 'existing' / 'conflict' when the job id already holds a reservation.
ALTER TABLE reservations ADD COLUMN debt_part bigint NOT NULL DEFAULT 0
    CHECK (debt_part >= 0 AND debt_part <= amount);

CREATE FUNCTION reserve_overdraft(p_account text, p_job_id text, p_amount bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    prior reservations%ROWTYPE;
    t record;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    SELECT * INTO prior FROM reservations r WHERE r.job_id = p_job_id;
    IF FOUND THEN
        RETURN CASE WHEN prior.account_id = p_account THEN 'existing' ELSE 'conflict' END;
    END IF;
    SELECT * INTO t FROM credits_take(p_account, acct.sub_available, p_amount, true);
    INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq, bucket_ids,
                              bucket_parts, debt_part)
    VALUES (p_job_id, p_account, p_amount, t.sub_taken, acct.period_seq, t.bucket_ids,
            t.bucket_parts, t.debt_added);
    INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, debt_delta,
                        reserved_delta, bucket_ids, bucket_deltas, amount, job_id)
    VALUES (p_account, 'reserve', 'reserve:' || p_job_id, -t.sub_taken, -t.purchased_taken,
            t.debt_added, p_amount, t.bucket_ids,
            (SELECT coalesce(array_agg(-x), '{}') FROM unnest(t.bucket_parts) AS x),
            p_amount, p_job_id);
    UPDATE accounts a
       SET sub_available = a.sub_available - t.sub_taken,
           purchased_available = a.purchased_available - t.purchased_taken,
           debt = a.debt + t.debt_added, reserved = a.reserved + p_amount
     WHERE a.id = p_account;
    RETURN 'reserved';
END $$;


-- As in 0001, with the overdraft's debt part (issue 17). The edits, marked "0023": what a
-- capture at or below the estimate did not spend comes back from the debt part first (it was
-- taken last), so a failed send leaves no debt behind.
CREATE OR REPLACE FUNCTION settle_reservation(p_job text, p_actual bigint)
RETURNS TABLE (status text, amount bigint, captured bigint, account_id text)
LANGUAGE plpgsql AS $$
DECLARE
    acct_id text;
    acct accounts%ROWTYPE;
    r reservations%ROWTYPE;
    extra record;
    back record;
    kind text := CASE WHEN p_actual IS NULL THEN 'release' ELSE 'capture' END;
    spent_sub bigint;
    spent_purchased bigint;
    back_ids bigint[] := '{}';
    back_parts bigint[] := '{}';
    debt_back bigint;  -- 0023
    i integer;
    part bigint;
BEGIN
    IF p_actual IS NOT NULL AND p_actual < 0 THEN
        RAISE EXCEPTION 'settle_reservation: actual cost must be >= 0, got %', p_actual;
    END IF;
    SELECT res.account_id INTO acct_id FROM reservations res WHERE res.job_id = p_job;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, 0::bigint, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = acct_id FOR UPDATE;
    SELECT * INTO r FROM reservations res WHERE res.job_id = p_job FOR UPDATE;
    IF r.status <> 'pending' THEN
        RETURN QUERY SELECT ('already_' || r.status)::text, r.amount, r.captured, r.account_id;
        RETURN;
    END IF;

    IF p_actual IS NOT NULL AND p_actual > r.amount THEN
        -- Real cost above the estimate: the difference is charged now, into debt if need be.
        SELECT * INTO extra FROM credits_take(acct.id, acct.sub_available,
                                              p_actual - r.amount, true);
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, debt_delta,
                            reserved_delta, bucket_ids, bucket_deltas, amount, job_id)
        VALUES (acct.id, 'capture', 'settle:' || p_job, -extra.sub_taken,
                -extra.purchased_taken, extra.debt_added, -r.amount, extra.bucket_ids,
                (SELECT coalesce(array_agg(-x), '{}') FROM unnest(extra.bucket_parts) AS x),
                p_actual, p_job);
        UPDATE accounts a
           SET sub_available = a.sub_available - extra.sub_taken,
               purchased_available = a.purchased_available - extra.purchased_taken,
               debt = a.debt + extra.debt_added,
               reserved = a.reserved - r.amount
         WHERE a.id = acct.id;
    ELSE
        -- Release, or capture at or below the estimate: the unused part goes back where it
        -- came from. What was spent counts against the subscription share first.
        spent_sub := LEAST(r.sub_part, coalesce(p_actual, 0));
        spent_purchased := coalesce(p_actual, 0) - spent_sub;
        FOR i IN 1 .. coalesce(array_length(r.bucket_ids, 1), 0) LOOP
            part := r.bucket_parts[i];
            IF spent_purchased >= part THEN
                spent_purchased := spent_purchased - part;
            ELSE
                back_ids := back_ids || r.bucket_ids[i];
                back_parts := back_parts || (part - spent_purchased);
                spent_purchased := 0;
            END IF;
        END LOOP;
        -- 0023: what is left was spent from the debt part; the rest of that part is owed no more.
        debt_back := r.debt_part - LEAST(r.debt_part, spent_purchased);
        SELECT * INTO back FROM credits_give_back(
            acct.id, acct.debt - debt_back, r.sub_part - spent_sub,
            r.period_seq = acct.period_seq, back_ids, back_parts);
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, debt_delta,
                            reserved_delta, bucket_ids, bucket_deltas, forfeited, amount, job_id)
        VALUES (acct.id, kind, 'settle:' || p_job, back.sub_delta, back.purchased_delta,
                back.debt_delta - debt_back, -r.amount, back.bucket_ids, back.bucket_deltas,
                back.forfeited, coalesce(p_actual, 0), p_job);  -- 0023: - debt_back
        UPDATE accounts a
           SET sub_available = a.sub_available + back.sub_delta,
               purchased_available = a.purchased_available + back.purchased_delta,
               debt = a.debt + back.debt_delta - debt_back,  -- 0023: - debt_back
               reserved = a.reserved - r.amount
         WHERE a.id = acct.id;
    END IF;
    UPDATE reservations res
       SET status = CASE WHEN p_actual IS NULL THEN 'released' ELSE 'captured' END,
           captured = p_actual, settled_at = now()
     WHERE res.job_id = p_job;
    RETURN QUERY SELECT (CASE WHEN p_actual IS NULL THEN 'released' ELSE 'captured' END)::text,
                        r.amount, p_actual, acct.id;
END $$;
