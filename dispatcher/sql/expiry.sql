-- Named statements of expiry (functions in migrations/0026_expiry_and_job_view.sql).

-- name: begin_expired_job
-- A consumed job already past its expires_at: recorded failed/expired, nothing reserved.
SELECT outcome, status, attempts
  FROM begin_expired_job($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9);

-- name: expire_jobs
-- The expiry sweep: waiting jobs past their expires_at at $1 (the sweeper's clock), at most $2.
SELECT expired_job_id, expired_kind, expired_broadcast_id, was_status FROM expire_jobs($1, $2);

-- name: expired_broadcasts
-- Running broadcasts past their expires_at at $1: their pending recipients are ended.
SELECT id FROM broadcasts
 WHERE status = 'running' AND expires_at <= $1
 ORDER BY expires_at
 LIMIT $2;

-- name: expire_broadcast_pending
SELECT expire_broadcast_pending($1, $2, $3);

-- name: broadcast_set_expiry
-- Stored with the broadcast, in its storing transaction: never sent after it.
UPDATE broadcasts SET expires_at = $2 WHERE id = $1;
