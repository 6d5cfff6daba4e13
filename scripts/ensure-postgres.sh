#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use (127.0.0.1:5432, database `test`) answers; starts the
# local cluster if it is down. Fails loudly if it cannot.
set -euo pipefail
ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ready; then exit 0; fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432 and pg_ctlcluster is not installed" >&2
  exit 1
fi
echo "starting PostgreSQL" >&2
pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
for _ in $(seq 1 60); do
  if ready; then exit 0; fi
  sleep 0.5
done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
