#!/usr/bin/env bash
# `make demo`: the main job on embedded defaults. Runs inside a private network namespace with its own
# bridge so it never touches the host's network, and removes everything it created on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
NS="nkudo-demo-$$"
WORK="$(mktemp -d /tmp/nkudo-demo.XXXXXX)"

cleanup() {
    pkill -KILL -f -- "--api-socket path=$WORK/" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "make demo needs root (it creates a network namespace, a bridge and opens /dev/kvm)" >&2
    exit 1
fi

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" link set br0 up
in_ns() { ip netns exec "$NS" "$@"; }

say "nkudo-edge version"
"$BIN/nkudo-edge" version

CH=cloud-hypervisor
if ! command -v cloud-hypervisor >/dev/null 2>&1; then
    if [ -x "$BIN/nkudo-ch-sim" ]; then
        CH="$BIN/nkudo-ch-sim"
        echo "cloud-hypervisor is not installed here: using the simulator nkudo-ch-sim in its place"
    else
        echo "cloud-hypervisor is not installed here (the check below reports it)"
    fi
fi

say "nkudo-edge check (in namespace $NS with bridge br0)"
set +e
in_ns "$BIN/nkudo-edge" --state-dir "$WORK/state" check --bridge br0 --cloud-hypervisor-bin "$CH" \
    --runtime-dir "$WORK/vms" --min-disk-gib 1
rc=$?
set -e
echo "(check exit code: $rc)"

say "nkudo-edge hostfacts (abridged)"
in_ns "$BIN/nkudo-edge" hostfacts --runtime-dir "$WORK/vms" > "$WORK/facts.json"
"$BIN/python" - "$WORK/facts.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"host {f['hostname']}: {f['os'].get('PRETTY_NAME')}, kernel {f['kernel']['release']} {f['arch']}")
print(f"cpu {f['cpu']['model']} x{f['cpu']['count']}, memory {f['memory']['total_bytes'] // 2**20} MiB")
print(f"kvm usable={f['kvm']['usable']} max_vcpus={f['kvm']['max_vcpus']}; bridges={f['bridges']}")
PY
say "nkudo-edge apply examples/lifecycle.json (create, pause, resume, snapshot, stop, start, delete)"
mkdir -p "$WORK/images"
printf 'demo kernel\n' > "$WORK/images/vmlinux"
truncate -s 64M "$WORK/images/rootfs.img"
sed "s#/var/lib/nkudo-edge/images#$WORK/images#g" examples/lifecycle.json > "$WORK/plan.json"
in_ns "$BIN/nkudo-edge" --log-level warn --state-dir "$WORK/state" apply --plan "$WORK/plan.json" \
    --runtime-dir "$WORK/vms" --snapshot-dir "$WORK/snapshots" --image-root "$WORK/images" \
    --cloud-hypervisor-bin "$CH" --bridge br0
echo "snapshot files:"; ls -l "$WORK/snapshots/web-1/first"
echo "applying the same plan again returns the recorded results without re-running anything:"
in_ns "$BIN/nkudo-edge" --log-level warn --state-dir "$WORK/state" apply --plan "$WORK/plan.json" \
    --runtime-dir "$WORK/vms" --snapshot-dir "$WORK/snapshots" --image-root "$WORK/images" \
    --cloud-hypervisor-bin "$CH" --bridge br0 | head -3

say "done: namespace, bridge, VMMs and temp files are removed on exit"
