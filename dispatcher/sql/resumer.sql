-- name: paused_accounts_with_credits
-- The resumer's safety sweep: paused accounts whose credits could release a held job (the same
-- condition as the dispatcher_resume NOTIFY), for a wake-up that was missed.
SELECT id FROM accounts
 WHERE paused_at IS NOT NULL AND sub_available + purchased_available - debt > 0
 ORDER BY paused_at;
