#!/usr/bin/env bash
# `make demo`: the whole system on embedded defaults, inside a private network namespace so it never
# touches the host's network: a control plane (SQLite), an enrolled edge agent, a plan executed on
# microVMs (nkudo-ch-sim stands in for cloud-hypervisor when it is not installed), then a walkthrough.
# Everything it starts (processes, namespace, bridge, TAPs, temp dirs) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
NS="nkudo-demo-$$"
WORK="$(mktemp -d /tmp/nkd.XXXXXX)"
CP_PORT=18443
METRICS_PORT=19090
AGENT_PID=""
CP_PID=""

cleanup() {
    set +e
    [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [ -n "$CP_PID" ] && kill -TERM "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null
    pkill -TERM -f -- "$WORK/" 2>/dev/null; sleep 0.5
    pkill -KILL -f -- "$WORK/" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { ip netns exec "$NS" "$@"; }
cp_cli() { in_ns "$BIN/nkudo-control-plane" "$@"; }
edge() { in_ns "$BIN/nkudo-edge" --state-dir "$WORK/agent/state" "$@"; }
json_get() { "$BIN/python" -c "import json,sys; print(json.load(sys.stdin)$1)"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "make demo needs root (it creates a network namespace, a bridge and TAPs, and opens /dev/kvm)" >&2
    exit 1
fi

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" link set br0 up

CH=cloud-hypervisor
if ! command -v cloud-hypervisor >/dev/null 2>&1; then
    CH="$BIN/nkudo-ch-sim"
    echo "cloud-hypervisor is not installed here: the simulator nkudo-ch-sim stands in for it (no guest really runs)"
fi

say "nkudo-edge version"
"$BIN/nkudo-edge" version

say "nkudo-edge check (preflight, in namespace $NS with bridge br0)"
set +e
edge check --bridge br0 --cloud-hypervisor-bin "$CH" --runtime-dir "$WORK/agent/vms" --min-disk-gib 1
echo "(check exit code: $?)"
set -e

say "control plane: serve on https://127.0.0.1:$CP_PORT (SQLite in $WORK/cp)"
# Started directly (not through a shell function) so that $! is the server itself: ip netns exec execs it.
ip netns exec "$NS" "$BIN/nkudo-control-plane" --log-level warn serve --data-dir "$WORK/cp" --listen "127.0.0.1:$CP_PORT" \
    --heartbeat-interval 2 > "$WORK/cp.log" 2>&1 &
CP_PID=$!
export NKUDO_CP_SERVER="https://127.0.0.1:$CP_PORT" NKUDO_CP_CA_FILE="$WORK/cp/ca.crt" NKUDO_CP_ADMIN_KEY_FILE="$WORK/cp/admin.key"
for _ in $(seq 100); do
    [ -f "$WORK/cp/admin.key" ] && in_ns curl -sf --cacert "$WORK/cp/ca.crt" "$NKUDO_CP_SERVER/healthz" >/dev/null 2>&1 && break
    sleep 0.2
done
TENANT=$(cp_cli tenant create --name "Demo Corp" --slug demo --json | json_get "['id']")
SITE=$(cp_cli site create --tenant "$TENANT" --name edge-lab --json | json_get "['id']")
TOKEN=$(cp_cli token create --tenant "$TENANT" --site "$SITE" --json | json_get "['token']")
echo "tenant $TENANT, site $SITE, one-time enrollment token issued"

say "nkudo-edge enroll"
edge enroll --control-plane "$NKUDO_CP_SERVER" --token "$TOKEN" --ca-file "$WORK/cp/ca.crt" --pki-dir "$WORK/agent/pki"

say "nkudo-edge run (background; metrics on 127.0.0.1:$METRICS_PORT)"
mkdir -p "$WORK/images"
printf 'demo kernel\n' > "$WORK/images/vmlinux"
truncate -s 64M "$WORK/images/rootfs.img"
ip netns exec "$NS" "$BIN/nkudo-edge" --state-dir "$WORK/agent/state" --log-level warn run --pki-dir "$WORK/agent/pki" --runtime-dir "$WORK/agent/vms" \
    --snapshot-dir "$WORK/agent/snapshots" --image-root "$WORK/images" --cloud-hypervisor-bin "$CH" \
    --exec-allow /usr/bin/uptime --metrics-addr "127.0.0.1:$METRICS_PORT" --heartbeat-interval 1 > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!

say "a plan from examples/lifecycle.json: create (cloud-init), pause, resume, snapshot, stop, start, delete"
sed "s#/var/lib/nkudo-edge/images#$WORK/images#g" examples/lifecycle.json > "$WORK/plan.json"
PLAN=$(cp_cli plan apply "$WORK/plan.json" --site "$SITE" --json | json_get "['plan_id']")
for _ in $(seq 300); do
    state=$(cp_cli plan show "$PLAN" --json | json_get "['plan_status']")
    case "$state" in SUCCEEDED|FAILED|CANCELLED) break ;; esac
    sleep 0.2
done
cp_cli plan show "$PLAN"

say "execution logs of the snapshot action"
SNAP_EXEC=$(cp_cli plan show "$PLAN" --json | json_get "['executions'][3]['id']")
cp_cli execution logs "$SNAP_EXEC"

say "nkudo-edge status"
edge status --pki-dir "$WORK/agent/pki"

say "a few metric lines (curl http://127.0.0.1:$METRICS_PORT/metrics)"
in_ns curl -s "http://127.0.0.1:$METRICS_PORT/metrics" \
    | grep -E '^nkudo_(actions_executed_total|heartbeats_sent_total|vms_total\{state="running"\}|build_info)' | head -12

say "done: agent and control plane stopped; namespace, bridge, TAPs, VMMs and temp files removed on exit"
[ "$state" = "SUCCEEDED" ]
