-- Named statements of pause, resume and the low-balance episode (migrations 0003, 0008).

-- name: account_pause_state
SELECT a.paused_at IS NOT NULL AS paused,
       a.paused_at,
       (SELECT count(*) FROM jobs j WHERE j.account_id = a.id AND j.status = 'held') AS held_jobs,
       (SELECT coalesce(sum(j.estimate), 0) FROM jobs j
         WHERE j.account_id = a.id AND j.status = 'held') AS held_credits,
       (SELECT min(j.created_at) FROM jobs j
         WHERE j.account_id = a.id AND j.status = 'held') AS oldest_held_at,
       (SELECT count(*) FROM jobs j WHERE j.account_id = a.id AND j.status = 'failed'
           AND j.reason = 'insufficient_credits') AS expired_jobs,
       a.low_balance_open,
       a.low_balance_episode
  FROM accounts a WHERE a.id = $1;

-- name: released_versions
-- The row versions of jobs just released from hold (release_held set their updated_at).
SELECT job_id, updated_at FROM jobs WHERE job_id = ANY($1::text[]);

-- name: claim_released_job
-- Compare-and-set right before the provider call: a released job that waited its turn past the
-- reconciler's grace may have been claimed by it (which moved updated_at); then it is the
-- reconciler's to send, and the resumer skips it. Once claimed here, the reconciler's own
-- claim (updated_at older than its cutoff) cannot match.
UPDATE jobs SET updated_at = now()
 WHERE job_id = $1 AND status = 'sending' AND updated_at = $2
RETURNING job_id;
