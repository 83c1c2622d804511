#!/usr/bin/env bash
# Install PostgreSQL server binaries (initdb, pg_ctl, postgres) on a fresh Debian/Ubuntu machine so that
# tests/cp can start a throwaway cluster. The tests never use a system cluster: they initdb into a temp dir and
# run it as the 'postgres' user (created by the package) on a private unix socket.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
have_bin() { command -v "$1" >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1; }
if ! have_bin initdb || ! have_bin pg_ctl; then
    apt-get update -qq
    # postgresql pulls the versioned server package; the cluster it may auto-create is stopped below.
    apt-get install -y -qq --no-install-recommends postgresql curl
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        for c in /etc/postgresql/*/main; do
            [ -d "$c" ] || continue
            v=$(basename "$(dirname "$c")")
            pg_ctlcluster "$v" main stop >/dev/null 2>&1 || true
        done
    fi
fi
command -v curl >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq --no-install-recommends curl; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
echo "PostgreSQL binaries: ${bin:-$(dirname "$(command -v initdb)")}"
