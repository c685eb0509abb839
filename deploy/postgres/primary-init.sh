#!/bin/sh
# compose.cluster.yaml, primary's first start (docker-entrypoint-initdb.d): the role the standby
# streams with, allowed to connect for replication. Local-only placeholder password.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator-local-only';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
