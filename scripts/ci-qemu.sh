#!/usr/bin/env bash
# Debian packages for the real-guest tests of the QEMU provider (tests/qemu, benchmarks/test_qemu_bench.py):
#   qemu-system-x86          QEMU (microvm machine, TCG and KVM)
#   linux-image-cloud-amd64  the guest kernel (/boot/vmlinuz-*-cloud-amd64) and its modules
#   busybox-static           the guest's userland; the tests build the initramfs from it
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(qemu-system-x86 linux-image-cloud-amd64 busybox-static)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null
