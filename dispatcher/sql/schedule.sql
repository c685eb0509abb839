-- Named statements of scheduled sends, cancels and quiet hours (migration 0025).

-- name: quiet_hours_accounts
SELECT id, quiet_hours_start, quiet_hours_end FROM accounts WHERE quiet_hours_start IS NOT NULL;

-- name: wait_job
-- Store a job that waits for its time, nothing reserved (see wait_job in migration 0025).
SELECT outcome, status, attempts
  FROM wait_job($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12);

-- name: release_due_jobs
-- Waiting jobs due at $1 (up to $2): reserved and `sending` ('released'), or held.
SELECT job_id, payload, kind, attempts, outcome FROM release_due_jobs($1, $2);

-- name: release_due_broadcasts
-- Scheduled broadcasts due at $1 start running (the runner reserves them batch by batch); the
-- row update decides, so with several releasers each broadcast starts once, and a cancel that
-- committed first wins.
UPDATE broadcasts SET status = 'running'
 WHERE status = 'scheduled' AND send_at <= $1
RETURNING id;

-- name: cancel_request
-- An AMQP `cancel` job ($1 its id) for target $3 of account $2.
SELECT cancel_request($1, $2, $3);

-- name: cancel_target
-- The API's cancel of a job or broadcast $2 of account $1.
SELECT cancel_target($1, $2);

-- name: cancel_broadcast_anytime
SELECT cancel_broadcast_anytime($1);

-- name: defer_broadcast_batch
SELECT job_id FROM defer_broadcast_batch($1, $2, $3, $4::jsonb[], $5, $6, $7, $8, $9);

-- name: broadcast_deferred
-- A broadcast's recipients waiting for their quiet hours to end, and the last of those ends.
SELECT count(*) AS deferred, max(not_before) AS deferred_until
  FROM jobs WHERE broadcast_id = $1 AND status = 'deferred';

-- name: job_status_of
-- A job of this account: its status and when it may go (for the cancel route's answer).
SELECT job_id, status, not_before, reason FROM jobs WHERE job_id = $2 AND account_id = $1;

-- name: get_quiet_hours
SELECT quiet_hours_start, quiet_hours_end FROM accounts WHERE id = $1;

-- name: set_quiet_hours
UPDATE accounts SET quiet_hours_start = $2, quiet_hours_end = $3 WHERE id = $1
RETURNING quiet_hours_start, quiet_hours_end;

-- name: broadcast_schedule
-- A broadcast just stored (same transaction) that waits for its send_at.
UPDATE broadcasts SET status = 'scheduled', send_at = $2 WHERE id = $1;

-- name: broadcast_send_at
SELECT send_at FROM broadcasts WHERE id = $1;
