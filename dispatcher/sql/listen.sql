-- name: name_listen_session
-- A listening connection of its own says so in pg_stat_activity (operators, tests).
SELECT set_config('application_name', $1, false);
