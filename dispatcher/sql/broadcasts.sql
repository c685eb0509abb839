-- name: broadcast_insert
INSERT INTO broadcasts (id, account_id, priority, sender, messaging_service_sid, body, footer,
                        total, skipped, estimate, metadata, fingerprint, smart_encoding)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: broadcast_emit_skipped
-- A `skipped` status event for each skipped recipient, in the transaction that stores them.
SELECT emit_broadcast_skipped($1);

-- name: broadcast_identity
-- Whose broadcast an id is, and the fingerprint of its content (NULL: submitted over HTTP).
SELECT account_id, fingerprint FROM broadcasts WHERE id = $1;

-- name: broadcast_pending_batch
-- From a seq on: entries of recipients already queued stay in the pending index until a
-- vacuum, so always starting from the first would read all of them again for each batch.
SELECT seq, to_number, vars FROM broadcast_recipients
 WHERE broadcast_id = $1 AND status = 'pending' AND seq > $2
 ORDER BY seq
 LIMIT $3;

-- name: begin_broadcast_batch
SELECT job_id FROM begin_broadcast_batch($1, $2, $3, $4::jsonb[], $5, $6, $7, $8);

-- name: running_broadcasts
SELECT id, account_id, sender, messaging_service_sid, body, footer, priority, created_at,
       metadata::text AS metadata, smart_encoding,
       expires_at,  -- migration 0026
       send_at  -- migration 0025
  FROM broadcasts WHERE status = 'running' ORDER BY created_at;

-- name: broadcast_get
SELECT id, account_id, status, priority, total, skipped, estimate, created_at, finished_at
  FROM broadcasts WHERE id = $1;

-- name: broadcast_counts_insert
INSERT INTO broadcast_counts (broadcast_id, pending) VALUES ($1, $2);

-- name: broadcast_progress
-- Kept by begin_broadcast_batch, cancel_broadcast and a trigger on jobs (migration 0011).
SELECT pending, sending, sent, delivered, failed, held, canceled + recipients_canceled AS canceled,
       credits_reserved, credits_spent
  FROM broadcast_counts WHERE broadcast_id = $1;

-- name: broadcast_recount
-- What broadcast_progress must always equal, counted from the rows.
SELECT pending, sending, sent, delivered, failed, held, canceled + recipients_canceled AS canceled,
       credits_reserved, credits_spent
  FROM broadcast_recount($1);

-- name: broadcast_finish_if_done
UPDATE broadcasts b SET status = 'completed', finished_at = now()
 WHERE b.id = $1 AND b.status = 'running'
   AND NOT EXISTS (SELECT 1 FROM broadcast_recipients r
                    WHERE r.broadcast_id = b.id AND r.status = 'pending')
   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.broadcast_id = b.id
                    AND j.status IN ('held', 'sending', 'retry_wait', 'unknown',
                                     'deferred'))  -- deferred: quiet hours (0025)
RETURNING id;

-- name: broadcast_cancel
SELECT cancel_broadcast($1);

-- name: preflight_account
SELECT sub_available + purchased_available - debt AS available, auto_recharge_enabled,
       auto_recharge_threshold, auto_recharge_amount, smart_encoding
  FROM accounts WHERE id = $1;

-- name: broadcast_account_opt_outs
SELECT number FROM opt_outs WHERE account_id = $1 LIMIT $2;
