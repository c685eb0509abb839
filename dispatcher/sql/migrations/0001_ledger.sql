-- Credit ledger: accounts, rollover buckets, two-phase reservations, an append-only ledger, rates.
--
-- Units are whole credits (bigint). Available credits of an account are
--   sub_available + purchased_available - debt
-- where debt > 0 only after a settlement above its estimate; any credit that comes back or
-- arrives later repays debt first, so debt > 0 implies sub_available = purchased_available = 0.
--
-- Every function below locks the account row first, then works on its buckets and reservations,
-- so concurrent callers for one account serialise and callers for different accounts never wait.
-- Each statement of a plpgsql function takes a fresh snapshot, so reads after the lock are current.

CREATE TABLE accounts (
    id                       text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    name                     text NOT NULL DEFAULT '',
    allocation               bigint NOT NULL DEFAULT 0 CHECK (allocation >= 0),
    cadence                  text NOT NULL DEFAULT 'monthly'
                             CHECK (cadence IN ('monthly', 'annual', 'annual_monthly')),
    renewal_day              smallint NOT NULL DEFAULT 1 CHECK (renewal_day BETWEEN 1 AND 31),
    next_allocation          bigint CHECK (next_allocation >= 0),
    plan_changes             integer NOT NULL DEFAULT 0,
    period_seq               integer NOT NULL DEFAULT 0,
    period_start             timestamptz,
    period_end               timestamptz,
    sub_available            bigint NOT NULL DEFAULT 0 CHECK (sub_available >= 0),
    purchased_available      bigint NOT NULL DEFAULT 0 CHECK (purchased_available >= 0),
    debt                     bigint NOT NULL DEFAULT 0 CHECK (debt >= 0),
    reserved                 bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    auto_recharge_enabled    boolean NOT NULL DEFAULT false,
    auto_recharge_threshold  bigint NOT NULL DEFAULT 0 CHECK (auto_recharge_threshold >= 0),
    auto_recharge_amount     bigint NOT NULL DEFAULT 0 CHECK (auto_recharge_amount >= 0),
    topup_at_zero            boolean NOT NULL DEFAULT true,
    created_at               timestamptz NOT NULL DEFAULT now(),
    CHECK (debt = 0 OR (sub_available = 0 AND purchased_available = 0))
);

-- Purchased, auto-recharge and adjustment credits: one bucket per grant, spent oldest first.
CREATE TABLE credit_buckets (
    id          bigserial PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    kind        text NOT NULL CHECK (kind IN ('purchase', 'auto_recharge', 'adjustment')),
    reference   text NOT NULL UNIQUE,
    granted     bigint NOT NULL CHECK (granted > 0),
    remaining   bigint NOT NULL CHECK (remaining >= 0),
    refunded    bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_buckets_spendable ON credit_buckets (account_id, id) WHERE remaining > 0;

CREATE TABLE reservations (
    job_id        text PRIMARY KEY,
    account_id    text NOT NULL REFERENCES accounts (id),
    amount        bigint NOT NULL CHECK (amount > 0),
    sub_part      bigint NOT NULL CHECK (sub_part >= 0),
    period_seq    integer NOT NULL,
    bucket_ids    bigint[] NOT NULL DEFAULT '{}',
    bucket_parts  bigint[] NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'captured', 'released')),
    captured      bigint CHECK (captured >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    settled_at    timestamptz
);
CREATE INDEX reservations_pending ON reservations (created_at) WHERE status = 'pending';
CREATE INDEX reservations_account ON reservations (account_id);

CREATE TABLE ledger (
    id               bigserial PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    kind             text NOT NULL CHECK (kind IN (
                         'grant_purchase', 'grant_auto_recharge', 'grant_adjustment',
                         'subscription_allocation', 'subscription_forfeit', 'plan_upgrade',
                         'reserve', 'capture', 'release', 'refund')),
    reference        text NOT NULL UNIQUE,
    sub_delta        bigint NOT NULL DEFAULT 0,
    purchased_delta  bigint NOT NULL DEFAULT 0,
    debt_delta       bigint NOT NULL DEFAULT 0,
    reserved_delta   bigint NOT NULL DEFAULT 0,
    bucket_ids       bigint[] NOT NULL DEFAULT '{}',
    bucket_deltas    bigint[] NOT NULL DEFAULT '{}',
    -- Subscription credits that expired inside this change (returned after their period ended).
    forfeited        bigint NOT NULL DEFAULT 0,
    amount           bigint NOT NULL DEFAULT 0,
    job_id           text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_account ON ledger (account_id, id);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are append-only';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

CREATE TABLE rates (
    channel     text NOT NULL CHECK (channel IN ('sms', 'call')),
    -- ISO 3166-1 alpha-2, or '*' for the default of countries not listed.
    country     text NOT NULL CHECK (country = '*' OR country ~ '^[A-Z]{2}$'),
    credits     bigint NOT NULL CHECK (credits >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, country)
);
INSERT INTO rates (channel, country, credits) VALUES ('sms', '*', 1), ('call', '*', 2);


-- Take `amount` from the account's spendable credits: subscription first, then buckets oldest
-- first, then (only when allowed) debt. Updates buckets; the caller updates the account row.
CREATE FUNCTION credits_take(
    p_account text, p_sub_available bigint, p_amount bigint, p_allow_debt boolean,
    OUT sub_taken bigint, OUT purchased_taken bigint, OUT debt_added bigint,
    OUT bucket_ids bigint[], OUT bucket_parts bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    rest bigint;
BEGIN
    sub_taken := LEAST(p_sub_available, p_amount);
    rest := p_amount - sub_taken;
    bucket_ids := '{}';
    bucket_parts := '{}';
    purchased_taken := 0;
    debt_added := 0;
    IF rest > 0 THEN
        WITH spendable AS (
            SELECT b.id, b.remaining,
                   sum(b.remaining) OVER (ORDER BY b.id) - b.remaining AS before
              FROM credit_buckets b
             WHERE b.account_id = p_account AND b.remaining > 0
        ), parts AS (
            SELECT s.id, LEAST(s.remaining, rest - s.before) AS part
              FROM spendable s WHERE s.before < rest
        ), spent AS (
            UPDATE credit_buckets b SET remaining = b.remaining - parts.part
              FROM parts WHERE b.id = parts.id
            RETURNING b.id, parts.part
        )
        SELECT coalesce(array_agg(spent.id ORDER BY spent.id), '{}'),
               coalesce(array_agg(spent.part ORDER BY spent.id), '{}'),
               coalesce(sum(spent.part), 0)
          INTO bucket_ids, bucket_parts, purchased_taken
          FROM spent;
        rest := rest - purchased_taken;
    END IF;
    IF rest > 0 THEN
        IF NOT p_allow_debt THEN
            RAISE EXCEPTION 'credits_take: insufficient credits for %', p_account;
        END IF;
        debt_added := rest;
    END IF;
END $$;


-- Give credits back (a release, or the unused part of a capture) to the buckets they came
-- from. A subscription share from an ended period is forfeited. Any debt is repaid first.
CREATE FUNCTION credits_give_back(
    p_account text, p_debt bigint, p_sub_back bigint, p_sub_period_current boolean,
    p_bucket_ids bigint[], p_bucket_parts bigint[],
    OUT sub_delta bigint, OUT purchased_delta bigint, OUT debt_delta bigint,
    OUT bucket_ids bigint[], OUT bucket_deltas bigint[], OUT forfeited bigint
) LANGUAGE plpgsql AS $$
DECLARE
    debt_left bigint := p_debt;
    repay bigint;
    i integer;
    part bigint;
BEGIN
    sub_delta := 0;
    purchased_delta := 0;
    forfeited := 0;
    bucket_ids := '{}';
    bucket_deltas := '{}';
    IF p_sub_back > 0 THEN
        IF p_sub_period_current THEN
            repay := LEAST(debt_left, p_sub_back);
            debt_left := debt_left - repay;
            sub_delta := p_sub_back - repay;
        ELSE
            forfeited := p_sub_back;
        END IF;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_bucket_ids, 1), 0) LOOP
        part := p_bucket_parts[i];
        repay := LEAST(debt_left, part);
        debt_left := debt_left - repay;
        part := part - repay;
        IF part > 0 THEN
            UPDATE credit_buckets SET remaining = remaining + part WHERE id = p_bucket_ids[i];
            bucket_ids := bucket_ids || p_bucket_ids[i];
            bucket_deltas := bucket_deltas || part;
            purchased_delta := purchased_delta + part;
        END IF;
    END LOOP;
    debt_delta := debt_left - p_debt;
END $$;


-- Reserve credits for a batch of one account's jobs, in order, as far as the balance allows.
-- Per job: 'reserved' (new), 'existing' (this job id already has a reservation on this
-- account: nothing new is reserved), 'insufficient' (not reserved; every later new job of the
-- batch is not reserved either), or 'conflict' (the job id belongs to another account).
-- Unknown account: one row with status 'unknown_account' per job.
CREATE FUNCTION reserve_batch(p_account text, p_job_ids text[], p_amounts bigint[])
RETURNS TABLE (job_id text, status text, amount bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    avail bigint;
    sub bigint;
    reserved_total bigint := 0;
    sub_total bigint := 0;
    purchased_total bigint := 0;
    exhausted boolean := false;
    existing reservations%ROWTYPE;
    t record;
    i integer;
    n integer := coalesce(array_length(p_job_ids, 1), 0);
BEGIN
    IF n <> coalesce(array_length(p_amounts, 1), 0) THEN
        RAISE EXCEPTION 'reserve_batch: % job ids but % amounts', n, array_length(p_amounts, 1);
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT u, 'unknown_account'::text, 0::bigint, 0::bigint
                       FROM unnest(p_job_ids) AS u;
        RETURN;
    END IF;
    avail := acct.sub_available + acct.purchased_available - acct.debt;
    sub := acct.sub_available;
    FOR i IN 1 .. n LOOP
        IF p_amounts[i] IS NULL OR p_amounts[i] <= 0 THEN
            RAISE EXCEPTION 'reserve_batch: amount must be positive, got %', p_amounts[i];
        END IF;
        SELECT * INTO existing FROM reservations r WHERE r.job_id = p_job_ids[i];
        IF FOUND THEN
            job_id := p_job_ids[i];
            status := CASE WHEN existing.account_id = p_account THEN 'existing' ELSE 'conflict' END;
            amount := existing.amount;
            available := avail;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF exhausted OR avail < p_amounts[i] THEN
            exhausted := true;
            job_id := p_job_ids[i];
            status := 'insufficient';
            amount := p_amounts[i];
            available := avail;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT * INTO t FROM credits_take(p_account, sub, p_amounts[i], false);
        sub := sub - t.sub_taken;
        avail := avail - p_amounts[i];
        sub_total := sub_total + t.sub_taken;
        purchased_total := purchased_total + t.purchased_taken;
        reserved_total := reserved_total + p_amounts[i];
        INSERT INTO reservations (job_id, account_id, amount, sub_part, period_seq,
                                  bucket_ids, bucket_parts)
        VALUES (p_job_ids[i], p_account, p_amounts[i], t.sub_taken, acct.period_seq,
                t.bucket_ids, t.bucket_parts);
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta,
                            reserved_delta, bucket_ids, bucket_deltas, amount, job_id)
        VALUES (p_account, 'reserve', 'reserve:' || p_job_ids[i], -t.sub_taken,
                -t.purchased_taken, p_amounts[i], t.bucket_ids,
                (SELECT coalesce(array_agg(-x), '{}') FROM unnest(t.bucket_parts) AS x),
                p_amounts[i], p_job_ids[i]);
        job_id := p_job_ids[i];
        status := 'reserved';
        amount := p_amounts[i];
        available := avail;
        RETURN NEXT;
    END LOOP;
    IF reserved_total > 0 THEN
        UPDATE accounts a
           SET sub_available = a.sub_available - sub_total,
               purchased_available = a.purchased_available - purchased_total,
               reserved = a.reserved + reserved_total
         WHERE a.id = p_account;
    END IF;
END $$;


-- Settle a reservation: capture p_actual credits (NULL means release everything).
-- Returns 'captured' / 'released', or 'already_captured' / 'already_released' when the job
-- was settled before (nothing changes), or 'unknown' when it has no reservation.
CREATE FUNCTION settle_reservation(p_job text, p_actual bigint)
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
        SELECT * INTO back FROM credits_give_back(
            acct.id, acct.debt, r.sub_part - spent_sub, r.period_seq = acct.period_seq,
            back_ids, back_parts);
        INSERT INTO ledger (account_id, kind, reference, sub_delta, purchased_delta, debt_delta,
                            reserved_delta, bucket_ids, bucket_deltas, forfeited, amount, job_id)
        VALUES (acct.id, kind, 'settle:' || p_job, back.sub_delta, back.purchased_delta,
                back.debt_delta, -r.amount, back.bucket_ids, back.bucket_deltas,
                back.forfeited, coalesce(p_actual, 0), p_job);
        UPDATE accounts a
           SET sub_available = a.sub_available + back.sub_delta,
               purchased_available = a.purchased_available + back.purchased_delta,
               debt = a.debt + back.debt_delta,
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


-- Grant rollover credits (purchase, auto_recharge, adjustment), idempotent by reference.
-- Returns 'granted', 'duplicate' (same reference, same account and amount: nothing changes),
-- 'conflict' (reference used for something else) or 'unknown_account'.
CREATE FUNCTION grant_credits(p_account text, p_amount bigint, p_kind text, p_reference text)
RETURNS TABLE (status text, bucket_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    prior ledger%ROWTYPE;
    repay bigint;
    new_bucket bigint;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'grant_credits: amount must be positive, got %', p_amount;
    END IF;
    IF p_kind NOT IN ('purchase', 'auto_recharge', 'adjustment') THEN
        RAISE EXCEPTION 'grant_credits: unknown kind %', p_kind;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, NULL::bigint;
        RETURN;
    END IF;
    SELECT * INTO prior FROM ledger l WHERE l.reference = 'grant:' || p_reference;
    IF FOUND THEN
        RETURN QUERY SELECT (CASE WHEN prior.account_id = p_account AND prior.amount = p_amount
                                  AND prior.kind = 'grant_' || p_kind
                                 THEN 'duplicate' ELSE 'conflict' END)::text,
                            prior.bucket_ids[1];
        RETURN;
    END IF;
    repay := LEAST(acct.debt, p_amount);
    INSERT INTO credit_buckets (account_id, kind, reference, granted, remaining)
    VALUES (p_account, p_kind, p_reference, p_amount, p_amount - repay)
    RETURNING id INTO new_bucket;
    INSERT INTO ledger (account_id, kind, reference, purchased_delta, debt_delta,
                        bucket_ids, bucket_deltas, amount)
    VALUES (p_account, 'grant_' || p_kind, 'grant:' || p_reference, p_amount - repay, -repay,
            ARRAY[new_bucket], ARRAY[p_amount - repay], p_amount);
    UPDATE accounts a
       SET purchased_available = a.purchased_available + p_amount - repay,
           debt = a.debt - repay
     WHERE a.id = p_account;
    RETURN QUERY SELECT 'granted'::text, new_bucket;
END $$;


-- Start a new subscription period: forfeit what is left of the last one (ledgered), then reset
-- the subscription credits to the allocation. Idempotent by reference.
CREATE FUNCTION start_subscription_period(
    p_account text, p_amount bigint, p_reference text,
    p_period_start timestamptz, p_period_end timestamptz
) RETURNS TABLE (status text)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    prior ledger%ROWTYPE;
    repay bigint;
BEGIN
    IF p_amount IS NULL OR p_amount < 0 THEN
        RAISE EXCEPTION 'start_subscription_period: amount must be >= 0, got %', p_amount;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text;
        RETURN;
    END IF;
    SELECT * INTO prior FROM ledger l WHERE l.reference = 'allocation:' || p_reference;
    IF FOUND THEN
        RETURN QUERY SELECT (CASE WHEN prior.account_id = p_account AND prior.amount = p_amount
                                 THEN 'duplicate' ELSE 'conflict' END)::text;
        RETURN;
    END IF;
    IF acct.sub_available > 0 THEN
        INSERT INTO ledger (account_id, kind, reference, sub_delta, forfeited, amount)
        VALUES (p_account, 'subscription_forfeit', 'forfeit:' || p_reference,
                -acct.sub_available, acct.sub_available, acct.sub_available);
    END IF;
    repay := LEAST(acct.debt, p_amount);
    INSERT INTO ledger (account_id, kind, reference, sub_delta, debt_delta, amount)
    VALUES (p_account, 'subscription_allocation', 'allocation:' || p_reference,
            p_amount - repay, -repay, p_amount);
    UPDATE accounts a
       SET sub_available = p_amount - repay,
           debt = a.debt - repay,
           period_seq = a.period_seq + 1,
           period_start = p_period_start,
           period_end = p_period_end,
           allocation = coalesce(a.next_allocation, a.allocation),
           next_allocation = NULL
     WHERE a.id = p_account;
    RETURN QUERY SELECT 'started'::text;
END $$;


-- Change the subscription allocation. Upgrades apply now: this period's subscription credits
-- grow by the difference. Downgrades apply at the next renewal; this period is untouched.
-- Purchased credits are never touched.
CREATE FUNCTION change_plan(p_account text, p_allocation bigint)
RETURNS TABLE (status text, sub_added bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    diff bigint;
    repay bigint;
BEGIN
    IF p_allocation IS NULL OR p_allocation < 0 THEN
        RAISE EXCEPTION 'change_plan: allocation must be >= 0, got %', p_allocation;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, 0::bigint;
        RETURN;
    END IF;
    IF p_allocation > acct.allocation THEN
        diff := p_allocation - acct.allocation;
        repay := LEAST(acct.debt, diff);
        INSERT INTO ledger (account_id, kind, reference, sub_delta, debt_delta, amount)
        VALUES (p_account, 'plan_upgrade',
                'plan:' || p_account || ':' || (acct.plan_changes + 1), diff - repay, -repay, diff);
        UPDATE accounts a
           SET allocation = p_allocation, next_allocation = NULL,
               sub_available = a.sub_available + diff - repay, debt = a.debt - repay,
               plan_changes = a.plan_changes + 1
         WHERE a.id = p_account;
        RETURN QUERY SELECT 'upgraded'::text, diff;
    ELSIF p_allocation < acct.allocation THEN
        UPDATE accounts a SET next_allocation = p_allocation, plan_changes = a.plan_changes + 1
         WHERE a.id = p_account;
        RETURN QUERY SELECT 'downgrade_scheduled'::text, 0::bigint;
    ELSE
        UPDATE accounts a SET next_allocation = NULL WHERE a.id = p_account;
        RETURN QUERY SELECT 'unchanged'::text, 0::bigint;
    END IF;
END $$;


-- Refund unspent credits of one purchase bucket, idempotent by the refund reference.
-- Returns 'refunded', 'duplicate', 'conflict', 'unknown_purchase' or 'too_large'.
CREATE FUNCTION refund_credits(p_account text, p_purchase_reference text, p_amount bigint,
                               p_reference text)
RETURNS TABLE (status text, refundable bigint)
LANGUAGE plpgsql AS $$
DECLARE
    acct accounts%ROWTYPE;
    bucket credit_buckets%ROWTYPE;
    prior ledger%ROWTYPE;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'refund_credits: amount must be positive, got %', p_amount;
    END IF;
    SELECT * INTO acct FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_account'::text, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO prior FROM ledger l WHERE l.reference = 'refund:' || p_reference;
    IF FOUND THEN
        RETURN QUERY SELECT (CASE WHEN prior.account_id = p_account AND prior.amount = p_amount
                                 THEN 'duplicate' ELSE 'conflict' END)::text, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO bucket FROM credit_buckets b
     WHERE b.reference = p_purchase_reference AND b.account_id = p_account
       AND b.kind IN ('purchase', 'auto_recharge')
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_purchase'::text, 0::bigint;
        RETURN;
    END IF;
    IF bucket.remaining < p_amount THEN
        RETURN QUERY SELECT 'too_large'::text, bucket.remaining;
        RETURN;
    END IF;
    UPDATE credit_buckets b SET remaining = b.remaining - p_amount,
                                refunded = b.refunded + p_amount
     WHERE b.id = bucket.id;
    INSERT INTO ledger (account_id, kind, reference, purchased_delta, bucket_ids, bucket_deltas,
                        amount)
    VALUES (p_account, 'refund', 'refund:' || p_reference, -p_amount, ARRAY[bucket.id],
            ARRAY[-p_amount], p_amount);
    UPDATE accounts a SET purchased_available = a.purchased_available - p_amount
     WHERE a.id = p_account;
    RETURN QUERY SELECT 'refunded'::text, bucket.remaining - p_amount;
END $$;
