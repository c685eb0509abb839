#!/bin/sh
# compose.cluster.yaml, primary's first start (docker-entrypoint-initdb.d): the role the standby
# streams with, allowed to connect for replication (local-only placeholder password), and
# synchronous replication to the standby named `standby` (its application_name, see
# standby-start.sh): every commit waits until the standby has it. Set here with ALTER SYSTEM,
# not on the command line, so that this initialisation itself does not wait for a standby that
# cannot exist yet; it applies from the server's real start on.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator-local-only';
ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (standby)';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
