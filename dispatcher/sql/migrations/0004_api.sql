-- HTTP API: bearer tokens, idempotency records of billing requests, and the opt-out list.

-- A token is shown once as `dsp_<token_id>_<secret>`; only sha256(secret) is kept. An operator
-- token has no account and may act on any account; every other token belongs to one account.
CREATE TABLE api_tokens (
    token_id     text PRIMARY KEY CHECK (token_id ~ '^[0-9a-f]{16}$'),
    secret_hash  bytea NOT NULL CHECK (length(secret_hash) = 32),
    account_id   text REFERENCES accounts (id),
    role         text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'service')),
    operator     boolean NOT NULL DEFAULT false,
    name         text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CHECK (operator = (account_id IS NULL))
);
CREATE INDEX api_tokens_account ON api_tokens (account_id);

-- One row per (account, Idempotency-Key) of a billing request. The row is claimed (inserted)
-- and completed in the same transaction as the change it guards, so a concurrent replay waits
-- on the unique key and then reads the stored response; a failed request leaves no row.
CREATE TABLE api_idempotency (
    account_id    text NOT NULL REFERENCES accounts (id),
    key           text NOT NULL CHECK (key ~ '^[!-~]{1,255}$'),
    request_hash  bytea NOT NULL,
    token_id      text REFERENCES api_tokens (token_id),
    status        integer,
    body          jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);
CREATE INDEX api_idempotency_created ON api_idempotency (created_at);

-- Recipients who asked an account to stop messaging them (STOP keywords, API, provider 21610).
-- The primary key serves both the list (by account, ordered by number) and the pre-flight's
-- lookup of many numbers at once (`number = ANY($2)`).
CREATE TABLE opt_outs (
    account_id  text NOT NULL REFERENCES accounts (id),
    number      text COLLATE "C" NOT NULL CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    source      text NOT NULL CHECK (source ~ '^[a-z_]{1,32}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, number)
);
