-- The per-sender rate limit shared by every replica (migration 0030).

-- name: take_sender_slots
-- Take $2 turns of sender $1 spaced $3 seconds apart: `tat` moves from max(tat, now) by
-- $2 * $3. Returns the new `tat` and the database's `now`, from which the caller works out
-- when each of its turns may go (rate_slots.grant_of).
INSERT INTO sender_rates AS r (sender, tat)
VALUES ($1, extract(epoch FROM statement_timestamp())::float8 + $2::int * $3::float8)
ON CONFLICT (sender) DO UPDATE
   SET tat = greatest(r.tat, extract(epoch FROM statement_timestamp())::float8)
             + $2::int * $3::float8
RETURNING tat, extract(epoch FROM statement_timestamp())::float8 AS now;
