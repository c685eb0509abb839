-- Fair share between accounts (issue 16, part 1): the staging area behind the consumer.
--
-- When one account has a backlog in a dispatcher process (more than its share of unacked
-- deliveries), its further deliveries of that lane are copied here, in order, and acked, so the
-- work queue behind them (other accounts' jobs) keeps flowing. A process's feeder claims an
-- account's staged deliveries (oldest first, FOR UPDATE SKIP LOCKED, under a lease it renews)
-- when that account's turn comes, and deletes each once its outcome is committed, exactly as a
-- RabbitMQ delivery is acked. A claim whose lease lapsed (its process died) is claimed again;
-- the job id makes that redelivery harmless, as for a RabbitMQ redelivery.
--
-- Nothing is reserved and no `jobs` row exists while a delivery waits here: it reaches
-- begin_job (reserve or hold, in order) when it is fed, like any other delivery.
CREATE TABLE staged_jobs (
    seq           bigserial PRIMARY KEY,          -- the order within an account and lane
    lane          smallint NOT NULL CHECK (lane IN (0, 1)),  -- 0 transactional, 1 bulk
    account_id    text NOT NULL,
    job_id        text,
    message_id    text,
    kind          text,
    exchange      text,
    routing_key   text,
    content_type  text,
    sent_at       timestamptz,                    -- the AMQP timestamp, if any
    headers       jsonb NOT NULL DEFAULT '{}',
    body          bytea NOT NULL,
    staged_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by    text,
    claimed_until timestamptz,
    claims        integer NOT NULL DEFAULT 0
);
CREATE INDEX staged_jobs_turn ON staged_jobs (account_id, lane, seq);
CREATE INDEX staged_jobs_claimed ON staged_jobs (claimed_by) WHERE claimed_by IS NOT NULL;
-- "Why hasn't it gone?": a job id that is staged is waiting for its fair turn (`queued`).
CREATE INDEX staged_jobs_job ON staged_jobs (job_id);

-- An account's share of a lane against other accounts with a backlog (deficit round robin:
-- `fair_weight` jobs per turn). 1 for everyone unless an operator gives a plan more.
ALTER TABLE accounts ADD COLUMN fair_weight smallint NOT NULL DEFAULT 1
    CHECK (fair_weight BETWEEN 1 AND 100);
