"""A real guest for the QEMU tests: the Debian cloud kernel plus a BusyBox initramfs built here.

Why build the initramfs in the tests (not ship a blob): it stays reviewable,
and it is made from what the Debian packages installed on this very host
(``busybox-static``, the kernel's own modules), so kernel and modules match.

The init (PID 1, a BusyBox shell script) loads the few modules the cloud
kernel builds as modules (virtio-mmio and virtio-net for the NIC, the ACPI
button and evdev so BusyBox ``acpid`` sees the power button), prints
:data:`READY_MARKER` on the serial console, then prints ``nkudo-tick N`` every
:data:`TICK_SECONDS`: the counter stops while the VM is paused and continues
after resume. ``acpid`` runs ``/etc/acpi/PWRF/00000080`` on a power-button
press, which prints :data:`POWEROFF_MARKER` and powers the guest off.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import stat
from pathlib import Path

READY_MARKER = "NKUDO-GUEST-READY"
POWEROFF_MARKER = "NKUDO-GUEST-POWEROFF"
TICK_SECONDS = 0.2
BUSYBOX = "/usr/bin/busybox"
#: Module load order: dependencies first (see modules.dep of the kernel).
MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/input/evdev.ko",
    "kernel/drivers/acpi/button.ko",
)
CMDLINE = "console=ttyS0 quiet panic=-1"

INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join("/lib/modules/" + os.path.basename(m) for m in MODULES)}; do
    [ -e "$m" ] && insmod "$m" || echo "nkudo-init: cannot load $m"
done
acpid -c /etc/acpi -p /var/run/acpid.pid -l /var/log/acpid.log || echo "nkudo-init: acpid failed"
ip link set lo up 2>/dev/null
nics=$(ls /sys/class/net | tr '\\n' ' ')
echo "{READY_MARKER} nics: $nics"
i=0
while true; do
    i=$((i + 1))
    echo "nkudo-tick $i"
    sleep {TICK_SECONDS}
done
"""

POWER_BUTTON = f"""#!/bin/sh
echo "{POWEROFF_MARKER}" > /dev/console
poweroff -f
"""


def find_kernel() -> str | None:
    """The Debian cloud kernel (``linux-image-cloud-amd64``), newest first; None when not installed."""
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"), key=_version_key, reverse=True)
    return found[0] if found else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def modules_dir(kernel: str) -> str:
    release = os.path.basename(kernel).removeprefix("vmlinuz-")
    return f"/lib/modules/{release}"


def _newc(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    """One entry of a ``newc`` cpio archive (the format the kernel unpacks as initramfs)."""
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + raw
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initramfs(dest: Path, kernel: str) -> Path:
    """Write a gzip-compressed newc initramfs to ``dest`` and return it."""
    mods = modules_dir(kernel)
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "proc", "sys", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules", "tmp", "var", "var/run", "var/log"):
        entries.append((d, stat.S_IFDIR | 0o755, b""))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()))
    for applet in ("sh", "mount", "insmod", "acpid", "echo", "sleep", "poweroff", "ls", "ps", "tr", "ip", "cat"):
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b""))  # rdev set below
    for m in MODULES:
        p = os.path.join(mods, m)
        data = Path(p).read_bytes() if os.path.exists(p) else None
        if data is None and os.path.exists(p + ".xz"):
            raise RuntimeError(f"{p}.xz is compressed; BusyBox insmod needs plain modules")
        if data is not None:
            entries.append((f"lib/modules/{os.path.basename(m)}", stat.S_IFREG | 0o644, data))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    entries.append(("etc/acpi/PWRF/00000080", stat.S_IFREG | 0o755, POWER_BUTTON.encode()))
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        rec = _newc(name, mode, data, ino)
        if name == "dev/console":  # character device 5:1
            rec = rec[:6 + 8 * 9] + b"%08x%08x" % (5, 1) + rec[6 + 8 * 11:]
        out += rec
    out += _newc("TRAILER!!!", 0)
    tmp = dest.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        f.write(bytes(out))
    os.replace(tmp, dest)
    return dest


def have_qemu() -> str | None:
    return shutil.which("qemu-system-x86_64")
