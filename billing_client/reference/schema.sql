-- The reference billing service's own state, created idempotently at start.
CREATE SCHEMA IF NOT EXISTS billing_ref;

-- One row per account seen; locked (upsert) while deciding, so decisions are serialized.
CREATE TABLE IF NOT EXISTS billing_ref.accounts (
    account       text PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_event_at timestamptz NOT NULL DEFAULT now()
);

-- The method for auto-recharge is chosen separately from the one that pays the subscription.
CREATE TABLE IF NOT EXISTS billing_ref.payment_methods (
    account    text NOT NULL,
    purpose    text NOT NULL CHECK (purpose IN ('auto_recharge', 'subscription')),
    role       text NOT NULL CHECK (role IN ('primary', 'backup')),
    token      text NOT NULL CHECK (token <> ''),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, purpose, role)
);

CREATE TABLE IF NOT EXISTS billing_ref.topups (
    id                bigserial PRIMARY KEY,
    account           text NOT NULL,
    episode           integer NOT NULL CHECK (episode >= 1),
    trigger_type      text NOT NULL,
    trigger_event_id  uuid NOT NULL,
    status            text NOT NULL CHECK (status IN ('in_flight', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    amount            bigint NOT NULL CHECK (amount > 0),
    method_used       text,
    last_reason       text,
    payment_reference text UNIQUE,
    grant_event_id    uuid,
    next_attempt_at   timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Never two top-ups in flight for one account.
CREATE UNIQUE INDEX IF NOT EXISTS topups_one_in_flight
    ON billing_ref.topups (account) WHERE status = 'in_flight';
CREATE INDEX IF NOT EXISTS topups_due
    ON billing_ref.topups (next_attempt_at) WHERE status = 'in_flight';
CREATE INDEX IF NOT EXISTS topups_episode ON billing_ref.topups (account, episode);

-- Every gateway request, written before the call so a crash reuses its idempotency key.
CREATE TABLE IF NOT EXISTS billing_ref.charges (
    id              bigserial PRIMARY KEY,
    topup_id        bigint NOT NULL REFERENCES billing_ref.topups (id),
    attempt         integer NOT NULL,
    role            text NOT NULL,
    idempotency_key text NOT NULL,
    status          text NOT NULL,
    charge_id       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS charges_topup ON billing_ref.charges (topup_id, role, id);

-- One invoice-like record per successful top-up.
CREATE TABLE IF NOT EXISTS billing_ref.invoices (
    id                bigserial PRIMARY KEY,
    topup_id          bigint NOT NULL UNIQUE REFERENCES billing_ref.topups (id),
    account           text NOT NULL,
    amount            bigint NOT NULL,
    credits           bigint NOT NULL,
    payment_reference text NOT NULL UNIQUE,
    charge_id         text NOT NULL,
    method            text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS invoices_account ON billing_ref.invoices (account, id);

CREATE TABLE IF NOT EXISTS billing_ref.processed_events (
    event_id     uuid PRIMARY KEY,
    event_type   text NOT NULL,
    account      text NOT NULL,
    episode      integer,
    decision     text,
    topup_id     bigint,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- Replies written in the transaction that decided them, relayed with publisher confirms.
CREATE TABLE IF NOT EXISTS billing_ref.outbox (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    routing_key  text NOT NULL,
    body         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON billing_ref.outbox (id) WHERE published_at IS NULL;

-- Recharge safety rules (issue 17), added in place: every statement is idempotent.
-- Per-account limits (NULL: the service's BILLING_* default) and the decline/cap state.
ALTER TABLE billing_ref.accounts
    ADD COLUMN IF NOT EXISTS hourly_limit integer CHECK (hourly_limit >= 1),
    ADD COLUMN IF NOT EXISTS decline_limit integer CHECK (decline_limit >= 1),
    ADD COLUMN IF NOT EXISTS monthly_cap bigint CHECK (monthly_cap > 0),
    ADD COLUMN IF NOT EXISTS cap_unit text NOT NULL DEFAULT 'credits'
        CHECK (cap_unit IN ('credits', 'money')),
    -- Set when the cap was reached: no automatic charge while month and cap are unchanged.
    ADD COLUMN IF NOT EXISTS capped_month text,
    ADD COLUMN IF NOT EXISTS capped_cap bigint,
    ADD COLUMN IF NOT EXISTS consecutive_declines integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS decline_run jsonb NOT NULL DEFAULT '[]',
    -- Auto-recharge turned itself off (consecutive declines); only an owner turns it back on.
    ADD COLUMN IF NOT EXISTS paused_at timestamptz,
    -- The dispatcher's auto_recharge.changed_at known when pausing: a later owner change, seen
    -- on a balance event, turns auto-recharge back on.
    ADD COLUMN IF NOT EXISTS paused_settings_at timestamptz,
    ADD COLUMN IF NOT EXISTS owner_changed_at timestamptz,
    -- The last balance event seen, so an owner's re-enable can charge once at once.
    ADD COLUMN IF NOT EXISTS last_trigger jsonb;

-- The limits in force when each charge was made, so the audit checks each charge exactly.
ALTER TABLE billing_ref.invoices
    ADD COLUMN IF NOT EXISTS hourly_limit integer,
    ADD COLUMN IF NOT EXISTS monthly_cap bigint,
    ADD COLUMN IF NOT EXISTS cap_unit text;
CREATE INDEX IF NOT EXISTS invoices_account_time ON billing_ref.invoices (account, created_at);

-- Each cap warning (80, 90) and the cap notice (100) once per account, month and cap value.
CREATE TABLE IF NOT EXISTS billing_ref.cap_notices (
    account    text NOT NULL,
    month      text NOT NULL,
    level      integer NOT NULL,
    cap        bigint NOT NULL,
    event_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, month, level, cap)
);
