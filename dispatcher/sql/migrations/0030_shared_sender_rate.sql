-- Issue 18, part 3: the per-sender rate limit holds across replicas.
--
-- One row per sending number: its GCRA bucket, which is a single time, `tat` (the theoretical
-- arrival time, seconds since the epoch on the database's clock). A replica takes a few turns
-- at once with one upsert (`take_sender_slots` in sql/ratelimit.sql) that moves `tat` on by
-- count / rate; which turn goes when follows from the old `tat` alone (see
-- dispatcher/dispatch/rate_slots.py).
--
-- UNLOGGED: no WAL, so a take never waits for the synchronous standby; a crash or a failover
-- empties the table, which leaves every bucket full again (at most one burst more).
CREATE UNLOGGED TABLE sender_rates (
    sender text PRIMARY KEY,
    tat double precision NOT NULL
);
