#!/usr/bin/env bash
# Install the nkudo edge agent on a host from a wheelhouse, without the network (air-gapped hosts).
#
#   packaging/install.sh [--dry-run] [--wheelhouse DIR] [--prefix /opt/nkudo] [--root /] [--python python3] [--no-start]
#
# What it does (each step is one command, printed with --dry-run instead of run):
#   1. copies the wheelhouse to PREFIX/wheelhouse (kept for re-installs and upgrades on the host);
#   2. creates the virtualenv PREFIX/venv and installs `nkudo` into it with
#      `pip install --no-index --find-links PREFIX/wheelhouse` (nothing is fetched);
#   3. links /usr/local/bin/nkudo-edge to the venv's script (the path the shipped unit runs);
#   4. installs the sysusers.d, modules-load.d and systemd unit files and, if absent, /etc/default/nkudo-edge;
#   5. creates the user, loads tun and bridge, reloads systemd and enables + starts nkudo-edge.
# --root DIR installs into a scratch root (an image being built, or a test): step 5 is skipped there,
# since it acts on the running system. --no-start does steps 1-4 and creates the user, but does not
# start the unit (enroll first: `nkudo-edge enroll ...`, then `systemctl enable --now nkudo-edge`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
systemd_dir=$here/systemd
wheelhouse=$here/../dist/wheelhouse
prefix=/opt/nkudo
root=/
python=python3
dry_run=0
start=1

usage() { sed -n '4p' "${BASH_SOURCE[0]}" | sed 's/^#  *//' >&2; exit 2; }
while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --no-start) start=0 ;;
        --wheelhouse) wheelhouse=${2:?--wheelhouse needs a directory}; shift ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --root) root=${2:?--root needs a directory}; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done

if ! compgen -G "$wheelhouse/nkudo-*.whl" >/dev/null; then
    echo "install.sh: no nkudo wheel in $wheelhouse: build the wheelhouse with \`make wheelhouse\` and copy dist/wheelhouse to this host" >&2
    exit 1
fi

root=${root%/}
dest=$root$prefix
run() {
    if ((dry_run)); then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

run install -d -m 0755 "$dest" "$root/usr/local/bin" "$root/usr/lib/sysusers.d" "$root/etc/modules-load.d" \
    "$root/etc/systemd/system" "$root/etc/default"
run rm -rf "$dest/wheelhouse"
run cp -r "$wheelhouse" "$dest/wheelhouse"
run "$python" -m venv "$dest/venv"
run env PIP_CONFIG_FILE=/dev/null "$dest/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$dest/wheelhouse" --upgrade nkudo
run ln -sfn "$prefix/venv/bin/nkudo-edge" "$root/usr/local/bin/nkudo-edge"
run install -m 0644 "$systemd_dir/sysusers.d/nkudo-edge.conf" "$root/usr/lib/sysusers.d/nkudo-edge.conf"
run install -m 0644 "$systemd_dir/modules-load.d/nkudo-edge.conf" "$root/etc/modules-load.d/nkudo-edge.conf"
run install -m 0644 "$systemd_dir/nkudo-edge.service" "$root/etc/systemd/system/nkudo-edge.service"
if [[ ! -e $root/etc/default/nkudo-edge ]]; then
    run install -m 0640 "$systemd_dir/nkudo-edge.default" "$root/etc/default/nkudo-edge"
fi

if [[ -n $root ]]; then
    echo "install.sh: installed into $root; the running system was not touched (no user, modules or unit started)"
    exit 0
fi
run systemd-sysusers /usr/lib/sysusers.d/nkudo-edge.conf
run modprobe -a tun bridge
run systemctl daemon-reload
if ((start)); then
    run systemctl enable --now nkudo-edge.service
else
    echo "install.sh: not started (--no-start): enroll with \`nkudo-edge enroll ...\`, then \`systemctl enable --now nkudo-edge\`"
fi
