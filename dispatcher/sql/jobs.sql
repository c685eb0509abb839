-- Named statements of the job state machine (functions in migrations/0002_jobs.sql).

-- name: begin_job
SELECT outcome, status, attempts
  FROM begin_job($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10);

-- name: job_accepted
SELECT job_accepted($1, $2);

-- name: job_not_sent
SELECT job_not_sent($1, $2, $3, $4);

-- name: job_unknown
SELECT job_unknown($1, $2);

-- name: job_retry_later
SELECT job_retry_later($1, $2, $3, $4);

-- name: job_retry_not_created
SELECT job_retry_not_created($1, $2);

-- name: job_provider_status
SELECT job_provider_status($1, $2, $3, $4, $5, $6);

-- name: get_job
SELECT job_id, account_id, kind, priority, status, payload, estimate, country, units, rate,
       broadcast_id, attempts, provider_sid, provider_status, error_code, reason, final_cost,
       created_at, updated_at, sent_at
  FROM jobs WHERE job_id = $1;

-- name: unresolved_jobs
SELECT job_id, account_id, kind, status, attempts, provider_sid, reason, payload, created_at,
       updated_at, sending_at
  FROM jobs
 WHERE status IN ('sending', 'unknown') AND updated_at < $1
 ORDER BY updated_at
 LIMIT $2;

-- name: unsettled_sent_jobs
SELECT job_id, kind, provider_sid, estimate, units, rate, updated_at
  FROM jobs
 WHERE status = 'sent' AND final_cost IS NULL AND updated_at < $1
 ORDER BY updated_at
 LIMIT $2;

-- name: count_jobs_by_status
SELECT status, count(*) AS jobs FROM jobs GROUP BY status;

-- name: claim_stuck_job
-- Bumping attempts makes a sender that still holds the old attempt number lose claim_for_send.
UPDATE jobs SET updated_at = now(), attempts = attempts + 1
 WHERE job_id = $1 AND status = $2 AND updated_at < $3
RETURNING job_id;

-- name: claim_for_send
-- Compare-and-set right before the provider call of a reserved job (released by the resumer,
-- a broadcast batch, or one that waited long for a provider slot), once its rate-limit turn
-- and its slot have come: if the reconciler took it over meanwhile (attempts moved) or its
-- broadcast was canceled, it is not ours to send. A claimed broadcast recipient is out of a
-- cancel's reach (migration 0016); updated_at is fresh, so the reconciler's own claim cannot
-- match before the send is over. 'claimed', or the job's status.
-- The job's broadcast (if a recipient) comes along for its latency metric.
SELECT claim_job_send($1, $2) AS status,
       (SELECT broadcast_id FROM jobs WHERE job_id = $1) AS broadcast_id;

-- name: unknown_job_count
SELECT count(*) FROM jobs WHERE status IN ('unknown', 'sending') AND updated_at < $1;

-- name: release_held
SELECT job_id, payload, kind, attempts, outcome FROM release_held($1, $2);

-- name: expire_held_by_kind
SELECT kind, expired FROM expire_held_by_kind($1, $2);

-- name: paused_accounts
SELECT id FROM accounts WHERE paused_at IS NOT NULL ORDER BY paused_at;

-- name: held_stats
SELECT (SELECT count(*) FROM accounts WHERE paused_at IS NOT NULL) AS paused_accounts,
       count(*) AS held_jobs,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_seconds
  FROM jobs WHERE status = 'held';

-- name: bound_sids
-- Which of these provider SIDs a job already owns (one round trip for a lookup's candidates).
SELECT provider_sid FROM jobs WHERE provider_sid = ANY($1::text[]);

-- name: begin_jobs
-- begin_job for a batch in one round trip and one transaction. The caller orders the rows by
-- account (then arrival), so account rows are always locked in the same order.
SELECT t.i, b.outcome, b.status, b.attempts
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bigint[],
              $7::text[], $8::integer[], $9::bigint[], $10::text[])
       WITH ORDINALITY AS t(job_id, account_id, kind, priority, payload, estimate, country,
                            units, rate, broadcast_id, i)
 CROSS JOIN LATERAL begin_job(t.job_id, t.account_id, t.kind, t.priority, t.payload,
                              t.estimate, t.country, t.units, t.rate, t.broadcast_id) b
 ORDER BY t.i;

-- name: jobs_accepted
-- job_accepted for a batch in one round trip; the caller orders the rows by job id.
SELECT t.i, a.status
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(job_id, sid, i)
 CROSS JOIN LATERAL job_accepted(t.job_id, t.sid) AS a(status)
 ORDER BY t.i;

-- name: jobs_provider_status
-- job_provider_status for a batch of status reports in one round trip and one transaction,
-- with the job lookup folded in: the cost is the reported units (else those reserved) times
-- the rate the job was reserved at; a report for another kind of job is ignored. Applied in
-- account, then job, then arrival order, so account and job rows are always locked in the same
-- order and a later report of a job sees the earlier ones (duplicates and regressions are
-- no-ops there, as one by one). A report that job_provider_status would ignore on the row as
-- read here is answered without locking anything: status and final_cost only move forward, so
-- it would still be ignored under the locks (most callbacks of a message are such repeats).
-- The job lookup is a LATERAL subquery kept apart (OFFSET 0): as a plain join, the generic
-- plan made while `jobs` was small (a fresh database, no ANALYZE yet) hashes a seq scan of
-- the whole table, and the connection keeps that plan as the table grows.
WITH items AS MATERIALIZED (
    SELECT t.i, t.job_id, t.kind, t.sid, t.status, t.settle, t.error_code,
           j.job_id IS NOT NULL AS found, j.kind AS job_kind,
           job_status_rank(t.status) <= job_status_rank(j.status)
               AND NOT (t.settle AND j.final_cost IS NULL AND job_status_rank(j.status) >= 4)
               AS stale,
           j.provider_sid IS NOT NULL AND t.sid IS NOT NULL AND j.provider_sid <> t.sid
               AS other_sid,
           coalesce(t.units, j.units)::bigint * j.rate AS cost
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[],
                  $6::integer[], $7::integer[])
           WITH ORDINALITY AS t(job_id, kind, sid, status, settle, units, error_code, i)
      LEFT JOIN LATERAL (SELECT * FROM jobs WHERE jobs.job_id = t.job_id OFFSET 0) j ON true
     ORDER BY j.account_id, t.job_id, t.i)
SELECT i, CASE WHEN NOT found THEN 'unknown_job'
               WHEN job_kind <> kind THEN 'ignored'
               WHEN other_sid THEN 'sid_mismatch'
               WHEN stale THEN 'ignored'
               ELSE job_provider_status(job_id, sid, status, cost, error_code, settle)
          END AS status
  FROM items;

-- name: job_dead_lettered
-- A `dead_lettered` status event for a job refused before it existed.
SELECT emit_dead_lettered($1, $2, $3, $4, $5::jsonb);

-- name: claim_due_retries
-- The retry sweeper's claim: due retry_wait jobs become `sending` (a new attempt) in one
-- statement; SKIP LOCKED lets replicas (and begin_job taking a consumed job's retry message)
-- share them without waiting, and each job is claimed once. The claimer then sends it.
UPDATE jobs j
   SET status = 'sending', attempts = j.attempts + 1, updated_at = now(), sending_at = now(),
       retry_at = NULL
  FROM (SELECT job_id FROM jobs
         WHERE status = 'retry_wait' AND retry_at <= now()
         ORDER BY retry_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED) due
 WHERE j.job_id = due.job_id AND j.status = 'retry_wait'
RETURNING j.job_id, j.kind, j.payload, j.attempts;

-- name: overdue_jobs
-- Every unfinished job that is not held, for operators (`dispatcher jobs unresolved`):
-- `sending` and `unknown` since before $1, `retry_wait` due before $1.
SELECT job_id, account_id, kind, status, attempts, provider_sid, reason, payload, created_at,
       updated_at, sending_at, retry_at
  FROM jobs
 WHERE (status IN ('sending', 'unknown') AND sending_at < $1)
    OR (status = 'retry_wait' AND retry_at < $1)
 ORDER BY sending_at
 LIMIT $2;

-- name: overdue_job_counts
-- The dispatcher_overdue_jobs gauge: unfinished jobs past the time they should have moved on
-- (each count reads one partial index).
SELECT (SELECT count(*) FROM jobs WHERE status = 'sending' AND sending_at < $1) AS sending,
       (SELECT count(*) FROM jobs WHERE status = 'retry_wait' AND retry_at < $1) AS retry_wait,
       (SELECT count(*) FROM jobs WHERE status = 'unknown' AND sending_at < $1) AS unknown;

-- name: unresolved_calls_to
-- Other unresolved calls between the same numbers: while there are any, a call the provider
-- holds for this pair cannot be told apart from theirs.
SELECT count(*) FROM jobs
 WHERE kind = 'call' AND status IN ('sending', 'unknown') AND job_id <> $1
   AND payload ->> 'to' = $2 AND payload ->> 'from' = $3;
