"""Read-only facts about the host that the checks and ``hostfacts`` decide on.

Why a module of its own: these never judge (no pass or fail), they only read
``/proc``, ``/sys``, ``PATH`` and binaries, so the agent's inventory reuses
them without the checks.
"""

from __future__ import annotations

import os


def kernel_version(release: str | None = None) -> tuple[int, ...]:
    rel = release if release is not None else os.uname().release
    parts: list[int] = []
    for piece in rel.split("-", 1)[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def which(name: str) -> str | None:
    """Resolve a command like the shell would, without importing shutil."""
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def parse_ch_version(output: str) -> tuple[int, int] | None:
    """``cloud-hypervisor v48.0.0`` → (48, 0). Returns None when unparsable."""
    for line in output.splitlines():
        for tok in line.split():
            if tok[:1] == "v" and tok[1:2].isdigit():
                nums = tok[1:].split("-", 1)[0].split(".")
                try:
                    return int(nums[0]), int(nums[1]) if len(nums) > 1 and nums[1].isdigit() else 0
                except ValueError:
                    return None
    return None


def nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    return out


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cgroup_info() -> dict[str, object]:
    """Which cgroup hierarchy is mounted at /sys/fs/cgroup and its v2 controllers."""
    mode = "none"
    v2_path = None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        mounts = []
    for m in mounts:
        if len(m) >= 3 and m[2] == "cgroup2":
            if m[1] == "/sys/fs/cgroup":
                mode, v2_path = "v2", m[1]
                break
            v2_path = v2_path or m[1]
    if mode != "v2":
        has_v1 = any(len(m) >= 3 and m[2] == "cgroup" for m in mounts)
        mode = (
            "hybrid" if has_v1 and v2_path else ("v1" if has_v1 else ("v2-elsewhere" if v2_path else "none"))
        )
    controllers: list[str] = []
    if v2_path:
        try:
            with open(os.path.join(v2_path, "cgroup.controllers"), encoding="ascii") as f:
                controllers = f.read().split()
        except OSError:
            controllers = []
    return {"mode": mode, "v2_path": v2_path, "controllers": controllers}


def qemu_version_from_binary(path: str) -> str | None:
    """QEMU's version read from its own banner string inside the binary, without running it.

    Why not ``qemu-system-x86_64 --version``: starting QEMU costs ~40 ms (it maps
    dozens of shared libraries), an eighth of the whole ``check`` start-up budget;
    finding the ``QEMU emulator version`` banner in the mapped file takes ~3 ms.
    """
    import mmap

    needle = b"QEMU emulator version "
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            i = m.find(needle)
            if i < 0:
                return None
            tail = m[i + len(needle) : i + len(needle) + 32]
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ver = tail.split(b" ", 1)[0].split(b"\0", 1)[0]
    ok = ver and all(c in b"0123456789." for c in ver)
    return ver.decode("ascii") if ok else None
