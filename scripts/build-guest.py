#!/usr/bin/env python3
"""Build the small real guest the QEMU tests boot, for `make demo`: ``build-guest.py OUT_DIR``.

One definition: this calls ``tests/qemu/guest.py`` (the Debian cloud kernel plus a BusyBox initramfs
built from this host's own ``busybox-static`` and kernel modules), so the demo boots exactly what the
tests boot. Writes ``OUT_DIR/vmlinuz`` and ``OUT_DIR/initramfs.cpio.gz`` and prints shell assignments
(``GUEST_KERNEL=... GUEST_INITRAMFS=... GUEST_CMDLINE=... GUEST_READY=...``). Exit 1, saying what is
missing, when the packages are not installed (``scripts/ci-qemu.sh`` installs them).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.qemu import guest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: build-guest.py OUT_DIR\n")
        return 2
    out = Path(argv[0])
    kernel = guest.find_kernel()
    missing = [name for name, ok in (("qemu-system-x86", guest.have_qemu()), ("linux-image-cloud-amd64", kernel),
                                     ("busybox-static", os.path.exists(guest.BUSYBOX))) if not ok]  # fmt: skip
    if missing or kernel is None:
        sys.stderr.write(f"build-guest: missing Debian packages: {' '.join(missing)} (scripts/ci-qemu.sh)\n")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel, out / "vmlinuz")
    initrd = guest.build_initramfs(out / "initramfs.cpio.gz", kernel)
    for key, value in (("GUEST_KERNEL", out / "vmlinuz"), ("GUEST_INITRAMFS", initrd), ("GUEST_CMDLINE", guest.CMDLINE),
                       ("GUEST_READY", guest.READY_MARKER)):  # fmt: skip
        print(f"{key}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
