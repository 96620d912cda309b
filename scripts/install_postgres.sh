#!/usr/bin/env bash
# Make a PostgreSQL server available for tests/test_postgres.py (which starts a throwaway cluster
# with initdb/pg_ctl on a loopback port; nothing is configured system-wide and no service is started).
# Installs the distribution's `postgresql` package when initdb is missing and we are root with
# apt-get; otherwise says why and exits 0, so the PostgreSQL tests skip with that reason.
set -uo pipefail

find_initdb() {
    command -v initdb 2>/dev/null && return 0
    ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 | grep . && return 0
    return 1
}

if find_initdb >/dev/null; then
    echo "install_postgres: PostgreSQL found ($(find_initdb))"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_postgres: initdb not found and not root: the PostgreSQL tests will be skipped" \
         "(install the 'postgresql' package to run them)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgres: initdb not found and no apt-get: the PostgreSQL tests will be skipped" \
         "(install PostgreSQL with this system's package manager to run them)"
    exit 0
fi
echo "install_postgres: installing the 'postgresql' package (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; then
    echo "install_postgres: apt-get could not install postgresql: the PostgreSQL tests will be skipped"
    exit 0
fi
echo "install_postgres: installed ($(find_initdb))"
