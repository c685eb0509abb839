-- Named statements of the HTTP API (tables in migrations/0004_api.sql). Credit changes go
-- through the ledger's functions (ledger.sql); these only read, or guard them.

-- name: api_token_insert
INSERT INTO api_tokens (token_id, secret_hash, account_id, role, operator, name)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: api_token_lookup
SELECT token_id, secret_hash, account_id, role, operator
  FROM api_tokens WHERE token_id = $1 AND revoked_at IS NULL;

-- name: api_token_revoke
UPDATE api_tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL
RETURNING token_id;

-- name: api_account_exists
SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1);

-- name: api_account_balance
SELECT id, sub_available, purchased_available, debt, reserved,
       sub_available + purchased_available - debt AS available, paused_at,
       auto_recharge_enabled, auto_recharge_threshold, auto_recharge_amount, topup_at_zero
  FROM accounts WHERE id = $1;

-- name: api_idempotency_claim
-- Waits while a concurrent request holds the same key, then inserts nothing if it committed.
INSERT INTO api_idempotency (account_id, key, request_hash, token_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (account_id, key) DO NOTHING
RETURNING true;

-- name: api_idempotency_get
SELECT request_hash, status, body::text AS body
  FROM api_idempotency WHERE account_id = $1 AND key = $2;

-- name: api_idempotency_complete
UPDATE api_idempotency SET status = $3, body = $4::jsonb
 WHERE account_id = $1 AND key = $2;

-- name: api_opt_out_add
-- Returns the entry whether it is new (created) or was already there (its first source kept).
INSERT INTO opt_outs (account_id, number, source) VALUES ($1, $2, $3)
ON CONFLICT (account_id, number) DO UPDATE SET source = opt_outs.source
RETURNING number, source, created_at, (xmax = 0) AS created;

-- name: api_opt_out_remove
DELETE FROM opt_outs WHERE account_id = $1 AND number = $2 RETURNING number;

-- name: api_opt_out_page
SELECT number, source, created_at
  FROM opt_outs
 WHERE account_id = $1 AND number > $2
 ORDER BY number
 LIMIT $3;

-- name: api_opted_out_among
SELECT number FROM opt_outs WHERE account_id = $1 AND number = ANY($2::text[]);

-- name: api_set_auto_recharge
UPDATE accounts
   SET auto_recharge_enabled = $2, auto_recharge_threshold = $3, auto_recharge_amount = $4,
       topup_at_zero = coalesce($5, topup_at_zero), auto_recharge_changed_at = now()
 WHERE id = $1
RETURNING auto_recharge_enabled, auto_recharge_threshold, auto_recharge_amount, topup_at_zero;

-- name: api_messaging_settings
SELECT smart_encoding FROM accounts WHERE id = $1;

-- name: api_set_messaging_settings
UPDATE accounts SET smart_encoding = $2 WHERE id = $1 RETURNING smart_encoding;
