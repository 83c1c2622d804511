#!/usr/bin/env bash
# `make demo`: the whole system on embedded defaults, inside a private network namespace so it never
# touches the host's network: a control plane (SQLite), an enrolled edge agent, a plan executed on
# microVMs, then a walkthrough. Which hypervisor runs them, said at the start:
#   - cloud-hypervisor when it is installed;
#   - else QEMU with a real guest when qemu-system-x86_64 and a guest kernel are (as .ci/run and
#     scripts/ci-qemu.sh install them): the BusyBox guest the tests boot (scripts/build-guest.py), its
#     console shown through `nkudo-edge console` and GET /vms/{id}/console, snapshotted and restored;
#   - else the simulator nkudo-ch-sim (no guest really runs).
# The dashboard (issue 13) is reachable from the host through a veth pair into the namespace: the demo prints
# its URL and a login (an owner of the demo tenant, random password) that works while its control plane runs.
# Everything it starts (processes, namespace, bridge, TAPs, veth, temp dirs) is removed on exit.
#
# `bash scripts/demo.sh --keep` (`make dashboard`): after the walkthrough, leave the control plane, the agent
# and a few VMs running and wait; Ctrl-C (or SIGTERM) cleans up as above.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h|--help) echo "usage: $0 [--keep]  (--keep: leave the demo running with the dashboard until Ctrl-C)"; exit 0 ;;
        *) echo "unknown argument: $arg (usage: $0 [--keep])" >&2; exit 2 ;;
    esac
done
BIN="$PWD/.venv/bin"
NS="nkudo-demo-$$"
WORK="$(mktemp -d /tmp/nkd.XXXXXX)"
CP_PORT=18443
METRICS_PORT=19090
AGENT_PID=""
CP_PID=""
VETH_HOST="nkdh$$"  # interface names: at most 15 characters
VETH_NS="nkdn$$"

cleanup() {
    set +e
    [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [ -n "$CP_PID" ] && kill -TERM "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null
    pkill -TERM -f -- "$WORK/" 2>/dev/null; sleep 0.5
    pkill -KILL -f -- "$WORK/" 2>/dev/null
    ip link del "$VETH_HOST" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
# Ctrl-C and SIGTERM end the demo through the EXIT trap (the background processes ignore SIGINT: no job control).
WAITING=0  # 1 while --keep waits: Ctrl-C is then the normal end (exit 0), before it an interruption (130)
trap 'echo; echo "stopping the demo"; exit $((WAITING ? 0 : 130))' INT TERM

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

# The dashboard from the host: a veth pair, host side .1/30, namespace side .2/30, in 10.213.0.0/24 (the first
# /30 no other interface of the host uses, so two demos can run side by side).
for k in $(seq 0 63); do
    HOST_IP="10.213.0.$((4 * k + 1))"
    NS_IP="10.213.0.$((4 * k + 2))"
    ip -4 -o addr show | grep -qE "inet ($HOST_IP|$NS_IP)/" || break
done
ip link add "$VETH_HOST" type veth peer name "$VETH_NS" netns "$NS"
ip addr add "$HOST_IP/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
ip -n "$NS" addr add "$NS_IP/30" dev "$VETH_NS"
ip -n "$NS" link set "$VETH_NS" up
DASH_URL="https://$NS_IP:$CP_PORT/ui/"
DASH_EMAIL="owner@demo.example.com"
DASH_PASSWORD=""

CH=cloud-hypervisor
MODE=cloud-hypervisor
PROVIDER_ARGS=()
if ! command -v cloud-hypervisor >/dev/null 2>&1; then
    CH="$BIN/nkudo-ch-sim"
    mkdir -p "$WORK/images"
    if GUEST_VARS=$("$BIN/python" scripts/build-guest.py "$WORK/images" 2>"$WORK/build-guest.err"); then
        eval "$GUEST_VARS"
        MODE=qemu
        PROVIDER_ARGS=(--provider qemu)
        echo "hypervisor: QEMU ($(qemu-system-x86_64 --version | head -1)) booting a real guest:" \
             "the Debian cloud kernel + BusyBox initramfs (cloud-hypervisor is not installed here)"
    else
        MODE=simulator
        echo "hypervisor: the simulator nkudo-ch-sim (no guest really runs): neither cloud-hypervisor nor" \
             "QEMU with a guest kernel is installed ($(cat "$WORK/build-guest.err"))"
    fi
else
    echo "hypervisor: cloud-hypervisor ($(cloud-hypervisor --version 2>/dev/null | head -1))"
fi

say "nkudo-edge version"
"$BIN/nkudo-edge" version

say "nkudo-edge check (preflight, in namespace $NS with bridge br0)"
set +e
edge check --bridge br0 --cloud-hypervisor-bin "$CH" --runtime-dir "$WORK/agent/vms" --min-disk-gib 1
echo "(check exit code: $?)"
set -e

say "control plane: serve on https://127.0.0.1:$CP_PORT and $DASH_URL (SQLite in $WORK/cp)"
# Started directly (not through a shell function) so that $! is the server itself: ip netns exec execs it.
# It listens on every address of the namespace: its loopback (the agent, the CLI) and the veth (the browser).
ip netns exec "$NS" "$BIN/nkudo-control-plane" --log-level warn serve --data-dir "$WORK/cp" --listen "0.0.0.0:$CP_PORT" \
    --server-name 127.0.0.1 --server-name localhost --server-name "$NS_IP" \
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

# The dashboard's login: an owner of the demo tenant, made with the admin CLI on the demo's database (the
# password read from stdin, random, printed only to this terminal; it dies with the demo's data dir).
DASH_PASSWORD=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(15))')
printf '%s\n' "$DASH_PASSWORD" | "$BIN/nkudo-control-plane" user create --data-dir "$WORK/cp" --email "$DASH_EMAIL" \
    --tenant-id "$TENANT" --role owner --password-stdin >/dev/null
# The URL and login, in lines a script can read (tests/e2e/test_demo.py does).
dashboard() {
    say "the dashboard ($1)"
    echo "dashboard URL: $DASH_URL"
    if [ "${2:-}" = short ]; then
        echo "login: email $DASH_EMAIL (password printed above)"
        return
    fi
    echo "login: email $DASH_EMAIL password $DASH_PASSWORD"
    echo "(owner of the tenant \"Demo Corp\"; the certificate is signed by the demo's own CA, $WORK/cp/ca.crt:"
    echo " import it or accept the browser's warning)"
    echo "from another machine: ssh -L $CP_PORT:$NS_IP:$CP_PORT root@$(timeout 2 hostname -f 2>/dev/null || hostname)," \
         "then open https://localhost:$CP_PORT/ui/"
}

say "nkudo-edge enroll"
edge enroll --control-plane "$NKUDO_CP_SERVER" --token "$TOKEN" --ca-file "$WORK/cp/ca.crt" --pki-dir "$WORK/agent/pki"

say "nkudo-edge run (background; metrics on 127.0.0.1:$METRICS_PORT; hypervisor: $MODE)"
mkdir -p "$WORK/images"
printf 'demo kernel\n' > "$WORK/images/vmlinux"
truncate -s 64M "$WORK/images/rootfs.img"
ip netns exec "$NS" "$BIN/nkudo-edge" --state-dir "$WORK/agent/state" --log-level warn run --pki-dir "$WORK/agent/pki" --runtime-dir "$WORK/agent/vms" \
    --snapshot-dir "$WORK/agent/snapshots" --image-root "$WORK/images" --cloud-hypervisor-bin "$CH" "${PROVIDER_ARGS[@]}" \
    --exec-allow /usr/bin/uptime --metrics-addr "127.0.0.1:$METRICS_PORT" --heartbeat-interval 1 > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!
dashboard "open it now to watch the walkthrough's plans live; it works while this demo's control plane runs"

# Runs a plan given as a JSON file through the control plane and waits for it to end; prints it.
run_plan() {
    local plan state
    plan=$(cp_cli plan apply "$1" --site "$SITE" --json | json_get "['plan_id']")
    for _ in $(seq 600); do
        state=$(cp_cli plan show "$plan" --json | json_get "['plan_status']")
        case "$state" in SUCCEEDED|FAILED|CANCELLED) break ;; esac
        sleep 0.2
    done
    cp_cli plan show "$plan"
    [ "$state" = "SUCCEEDED" ]
}
console() { edge console "$@" --runtime-dir "$WORK/agent/vms"; }
wait_console() {  # VM NEEDLE SECONDS: until the VM's console shows NEEDLE
    for _ in $(seq $(($3 * 5))); do
        console "$1" --lines 400 2>/dev/null | grep -q -- "$2" && return 0
        sleep 0.2
    done
    echo "the console of $1 never showed $2; its end:"; console "$1" --lines 20; return 1
}
api_console() {  # VM LINES: GET /vms/VM/console?lines=LINES until the agent shipped it (via a heartbeat)
    local body
    for _ in $(seq 100); do
        body=$(in_ns curl -sf --cacert "$WORK/cp/ca.crt" -H "X-Admin-Key: $(cat "$WORK/cp/admin.key")" \
            "$NKUDO_CP_SERVER/vms/$1/console?lines=$2")
        [ "$(printf '%s' "$body" | json_get "['state']")" != PENDING ] && break
        sleep 0.2
    done
    printf '%s' "$body" | json_get "['state']"
    printf '%s' "$body" | "$BIN/python" -c "import json,sys; sys.stdout.write(json.load(sys.stdin)['text'])"
}

if [ "$MODE" = qemu ]; then
    T0=$SECONDS
    if "$BIN/python" -c "from nkudo.wire.vocab import ActionType; ActionType('MicroVMRestore')" 2>/dev/null; then
        HAVE_RESTORE=1
    else
        HAVE_RESTORE=0
        echo "(this build has no MicroVMRestore yet: the demo snapshots the guest but does not restore it)"
    fi
    GUEST="\"kernel_path\": \"$GUEST_KERNEL\", \"initramfs_path\": \"$GUEST_INITRAMFS\", \"cmdline\": \"$GUEST_CMDLINE\""
    say "a real guest under QEMU: MicroVMCreate demo-1 (1 vCPU, 128 MiB, a NIC on br0)"
    cat > "$WORK/create.json" <<JSON
{"idempotency_key": "demo-create", "actions": [
  {"action_id": "demo-1-create", "type": "MicroVMCreate", "timeout_seconds": 120, "params": {
    "vm_id": "demo-1", "name": "demo", "vcpus": 1, "memory_mib": 128, $GUEST, "nics": [{"bridge": "br0"}]}}]}
JSON
    run_plan "$WORK/create.json"
    ACCEL=$(grep -o 'accel=[a-z]*' "$WORK/agent/vms/demo-1/vmm.log" | head -1 || true)
    wait_console demo-1 "$GUEST_READY" 60
    wait_console demo-1 "nkudo-tick 5" 30
    say "nkudo-edge console demo-1 --lines 5 (the guest's serial console, read on the host)"
    console demo-1 --lines 5
    say "GET /vms/demo-1/console?lines=3 (asked through the control plane, shipped by the agent's heartbeat)"
    api_console demo-1 3
    say "MicroVMSnapshot demo-1 (pause, migrate to a file, resume)$([ "$HAVE_RESTORE" = 1 ] && echo ", MicroVMDelete, MicroVMRestore demo-1 from it")"
    if [ "$HAVE_RESTORE" = 1 ]; then
        cat > "$WORK/snap.json" <<JSON
{"idempotency_key": "demo-snap", "actions": [
  {"action_id": "demo-1-snapshot", "type": "MicroVMSnapshot", "params": {"vm_id": "demo-1", "snapshot_name": "s1"}},
  {"action_id": "demo-1-delete", "type": "MicroVMDelete", "params": {"vm_id": "demo-1"}},
  {"action_id": "demo-1-restore", "type": "MicroVMRestore", "timeout_seconds": 120,
   "params": {"vm_id": "demo-1", "snapshot_name": "s1"}}]}
JSON
    else
        cat > "$WORK/snap.json" <<JSON
{"idempotency_key": "demo-snap", "actions": [
  {"action_id": "demo-1-snapshot", "type": "MicroVMSnapshot", "params": {"vm_id": "demo-1", "snapshot_name": "s1"}}]}
JSON
    fi
    before=$(console demo-1 --lines 400 | grep -o 'nkudo-tick [0-9]*' | tail -1)
    run_plan "$WORK/snap.json"
    ls -l "$WORK/agent/snapshots/demo-1/s1"
    if [ "$HAVE_RESTORE" = 1 ]; then
        wait_console demo-1 "nkudo-tick" 30
        sleep 1
        say "nkudo-edge console demo-1 --lines 3 after the restore: the counter goes on (memory restored, no boot)"
        console demo-1 --lines 3
        echo "last tick seen before the snapshot: ${before#nkudo-tick }; first tick of the restored guest:" \
             "$(console demo-1 --lines 400 | grep -o 'nkudo-tick [0-9]*' | head -1 | cut -d' ' -f2) (not 1: no second boot)"
    fi
    say "MicroVMDelete demo-1"
    cat > "$WORK/delete.json" <<JSON
{"idempotency_key": "demo-delete", "actions": [{"action_id": "demo-1-delete-end", "type": "MicroVMDelete", "params": {"vm_id": "demo-1"}}]}
JSON
    run_plan "$WORK/delete.json"
    state=SUCCEEDED
    echo "real-guest part took $((SECONDS - T0)) s under QEMU ($ACCEL)"
fi

if [ "$MODE" != qemu ]; then
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
fi

say "nkudo-edge status"
edge status --pki-dir "$WORK/agent/pki"

say "a few metric lines (curl http://127.0.0.1:$METRICS_PORT/metrics)"
in_ns curl -s "http://127.0.0.1:$METRICS_PORT/metrics" \
    | grep -E '^nkudo_(actions_executed_total|heartbeats_sent_total|vms_total\{state="running"\}|build_info)' | head -12

if [ "$state" != "SUCCEEDED" ]; then
    echo "the walkthrough's last plan ended $state: see $WORK/cp.log and $WORK/agent.log (removed on exit)"
    exit 1
fi

if [ "$KEEP" = 1 ]; then
    say "--keep: three VMs that stay (keep-1 and keep-2 running, keep-3 stopped) for the dashboard to show"
    if [ "$MODE" = qemu ]; then
        VM_PARAMS="\"vcpus\": 1, \"memory_mib\": 128, $GUEST"
    else
        VM_PARAMS="\"vcpus\": 1, \"memory_mib\": 256, \"kernel_path\": \"$WORK/images/vmlinux\",
            \"cmdline\": \"console=ttyS0 root=/dev/vda rw\", \"image_path\": \"$WORK/images/rootfs.img\""
    fi
    cat > "$WORK/keep.json" <<JSON
{"idempotency_key": "demo-keep", "actions": [
  {"action_id": "keep-1-create", "type": "MicroVMCreate", "timeout_seconds": 120, "params": {
    "vm_id": "keep-1", "name": "web", $VM_PARAMS, "nics": [{"bridge": "br0"}]}},
  {"action_id": "keep-2-create", "type": "MicroVMCreate", "timeout_seconds": 120, "params": {
    "vm_id": "keep-2", "name": "db", $VM_PARAMS, "nics": [{"bridge": "br0"}]}},
  {"action_id": "keep-3-create", "type": "MicroVMCreate", "timeout_seconds": 120, "params": {
    "vm_id": "keep-3", "name": "batch", $VM_PARAMS, "nics": [{"bridge": "br0"}]}},
  {"action_id": "keep-3-stop", "type": "MicroVMStop", "params": {"vm_id": "keep-3"}}]}
JSON
    run_plan "$WORK/keep.json"
    dashboard "the demo keeps running: press Ctrl-C to stop it and remove everything"
    # Until Ctrl-C (the INT trap exits, the EXIT trap cleans up) or until the control plane or the agent ends.
    WAITING=1
    wait -n "$CP_PID" "$AGENT_PID" || true
    echo "the control plane or the agent exited (see $WORK/cp.log, $WORK/agent.log); stopping the demo"
    tail -5 "$WORK/cp.log" "$WORK/agent.log" || true
    exit 1
fi

dashboard "it stops working now, when the demo exits; \`make dashboard\` (demo --keep) keeps it running" short
say "done ($MODE): agent and control plane stopped; namespace, bridge, TAPs, veth, VMMs and temp files removed on exit"
