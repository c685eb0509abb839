-- Named statements of the job view: `GET /v1/accounts/{account}/jobs/{job_id}` and
-- `dispatcher jobs show ID` (dispatcher/jobs/view.py). Read in one read-only snapshot.

-- name: job_view
-- The job, its account's credit state and, when held, what stands before it: the held jobs
-- ahead in the account's order and the credits needed to release it (its own included).
-- $2 NULL: any account (operators); else only a job of that account.
SELECT j.job_id, j.account_id, j.kind, j.priority, j.status, j.reason, j.error_code,
       j.estimate, j.final_cost, j.units, j.broadcast_id, j.attempts, j.provider_sid,
       j.created_at, j.updated_at, j.sending_at, j.sent_at, j.retry_at, j.not_before,
       j.expires_at,
       a.sub_available + a.purchased_available - a.debt AS available, a.paused_at,
       a.low_balance_open, a.low_balance_episode, a.auto_recharge_enabled,
       a.auto_recharge_amount, a.topup_at_zero,
       h.ahead AS held_ahead, h.needed AS credits_needed
  FROM jobs j
  JOIN accounts a ON a.id = j.account_id
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE x.hold_seq < j.hold_seq) AS ahead,
             coalesce(sum(x.estimate), 0) AS needed
        FROM jobs x
       WHERE j.status = 'held' AND x.account_id = j.account_id AND x.status = 'held'
         AND x.hold_seq <= j.hold_seq) h ON j.status = 'held'
 WHERE j.job_id = $1 AND ($2::text IS NULL OR j.account_id = $2);

-- name: job_view_reservation
SELECT amount, status, captured, created_at, settled_at FROM reservations WHERE job_id = $1;

-- name: job_view_ledger
-- The job's ledger rows: its reservation and its settlement (capture or release).
SELECT kind, reference, amount, created_at FROM ledger
 WHERE reference IN ('reserve:' || $1, 'settle:' || $1)
 ORDER BY id;

-- name: job_view_events
-- The job's status events, in the order they were written (index outbox_job_events, 0026).
SELECT body ->> 'status' AS status, body ->> 'reason' AS reason,
       (body ->> 'credits')::bigint AS credits, created_at
  FROM outbox
 WHERE exchange = 'events' AND body ->> 'job_id' = $1
 ORDER BY id;

-- name: job_view_recipient
-- A broadcast recipient that is not a job (yet): pending its fan-out, skipped, or dropped by
-- a cancel. Its job id is `<broadcast>:<seq>`.
SELECT r.broadcast_id, r.status, r.skip_reason, b.account_id, b.priority, b.created_at,
       b.expires_at
  FROM broadcast_recipients r
  JOIN broadcasts b ON b.id = r.broadcast_id
 WHERE r.broadcast_id = $1 AND r.seq = $2 AND ($3::text IS NULL OR b.account_id = $3);

-- name: job_view_staged
-- A job staged for its fair turn (migration 0027): no jobs row yet, nothing reserved.
SELECT job_id, account_id, kind, lane, staged_at, sent_at
  FROM staged_jobs
 WHERE job_id = $1 AND ($2::text IS NULL OR account_id = $2)
 ORDER BY seq LIMIT 1;
