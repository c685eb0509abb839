-- Named statements of the fair-share staging area (migrations/0027_fair_share.sql).

-- name: staged_claim
-- The oldest unclaimed (or lapsed) staged deliveries of one account and lane, claimed under a
-- lease by process $3; SKIP LOCKED lets replicas claim side by side, each row once.
UPDATE staged_jobs s
   SET claimed_by = $3, claimed_until = now() + make_interval(secs => $5), claims = s.claims + 1
  FROM (SELECT seq FROM staged_jobs
         WHERE account_id = $1 AND lane = $2
           AND (claimed_until IS NULL OR claimed_until < now())
         ORDER BY seq
         LIMIT $4
           FOR UPDATE SKIP LOCKED) c
 WHERE s.seq = c.seq
RETURNING s.seq, s.job_id, s.message_id, s.kind, s.exchange, s.routing_key, s.content_type,
          s.sent_at, s.headers, s.body, s.claims;

-- name: staged_done
-- Acks: the outcomes of these claimed deliveries are committed.
DELETE FROM staged_jobs WHERE seq = ANY($1::bigint[]) AND claimed_by = $2;

-- name: staged_release
-- Nacks: hand these claimed deliveries back (stopping), first in line again.
UPDATE staged_jobs SET claimed_by = NULL, claimed_until = NULL
 WHERE seq = ANY($1::bigint[]) AND claimed_by = $2;

-- name: staged_renew
-- Keep this process's claims alive while they wait in it.
UPDATE staged_jobs SET claimed_until = now() + make_interval(secs => $2)
 WHERE claimed_by = $1;

-- name: staged_waiting
-- Accounts and lanes with staged deliveries nobody holds (after a crash, or staged by
-- another replica): the feeder takes them up.
SELECT DISTINCT account_id, lane FROM staged_jobs
 WHERE claimed_until IS NULL OR claimed_until < now();

-- name: fair_weights
-- Accounts whose fair share is not the default 1.
SELECT id, fair_weight FROM accounts WHERE fair_weight <> 1;
