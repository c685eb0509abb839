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
