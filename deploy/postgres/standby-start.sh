#!/bin/sh
# compose.cluster.yaml, the standby: on an empty data directory, clone the primary with
# pg_basebackup (-R writes primary_conninfo and standby.signal), then run as a hot standby
# streaming from it. Its application_name, `standby`, is what the primary's
# synchronous_standby_names waits for. Promote it with:
#   docker compose -f deploy/compose.cluster.yaml exec -u postgres postgres-standby \
#     pg_ctl promote -D /var/lib/postgresql/data
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_basebackup --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream \
      --checkpoint=fast --dbname="host=postgres-primary port=5432 user=replicator password=replicator-local-only application_name=standby"; do
    echo "standby: waiting for the primary" >&2
    rm -rf "${PGDATA:?}"/*
    sleep 2
  done
  chmod 0700 "$PGDATA"
fi
# The clone carries the primary's synchronous_standby_names (postgresql.auto.conf); once this
# node is promoted it has no standby of its own, so it must not wait for one: cleared here (the
# command line wins over the configuration files).
exec postgres -c hot_standby=on -c synchronous_standby_names=
