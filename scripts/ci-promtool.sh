#!/usr/bin/env bash
# Install promtool on a fresh Debian/Ubuntu machine: tests/agent/test_metrics.py runs `promtool check metrics`
# on the agent's real /metrics output (and fails under CI=true if promtool is missing). Idempotent and quiet.
#
# Debian and Ubuntu ship promtool in the `prometheus` package (the server binary comes with it). Installing
# without recommends avoids the node exporter; policy-rc.d keeps the package's service from starting where
# an init system is running, so no Prometheus server takes port 9090 on the CI machine.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created_policy=1
    fi
    trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null 2>&1 || { echo "promtool still missing after installing 'prometheus'" >&2; exit 1; }
echo "promtool: $(promtool --version 2>&1 | head -1)"
