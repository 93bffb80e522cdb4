#!/usr/bin/env bash
# Make sure a Postgres server answers on 127.0.0.1:5432 as user postgres without a password (the tests'
# default GRIDFLEET_TEST_POSTGRES_URL). Installs it from Debian's packages and starts the cluster when
# needed. Meant for test machines: it trusts local connections.
set -euo pipefail

ready() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; }
ready && exit 0

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "postgres: installing from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q online; then
  echo "postgres: starting cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
fi
for _ in $(seq 30); do ready && exit 0; pg_isready -h 127.0.0.1 -q && break; sleep 1; done
if ! ready; then
  # A fresh install asks for passwords on TCP: trust local connections instead (test machines only).
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q '^# gridfleet-test' "$hba"; then
    printf '# gridfleet-test\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' | cat - "$hba" > "$hba.new"
    mv "$hba.new" "$hba" && chown postgres:postgres "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload || pg_ctlcluster "$version" main reload
  for _ in $(seq 30); do ready && break; sleep 1; done
fi
ready || { echo "postgres: still not reachable at 127.0.0.1:5432 as user postgres" >&2; exit 1; }
