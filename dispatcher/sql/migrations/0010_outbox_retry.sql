-- Billing events are published mandatory: one the broker returns (no queue bound to the billing
-- exchange) stays unpublished and is retried with backoff, without holding up the rows behind it.
ALTER TABLE outbox
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz;
