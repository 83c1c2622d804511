"""The KVM probe against the real /dev/kvm and against devices that are not KVM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nkudo import _native
from nkudo.host import kvm
from tests.conftest import require_native, skip_or_fail

CAPS = [*kvm.REQUIRED_CAPS["x86_64"].values(), *kvm.INFO_CAPS.values(), 999_999]


def _native_probe(path: str, caps: list[int], create_vm: bool) -> kvm.RawProbe:
    require_native("kvm")
    mod = _native.load("kvm")
    assert mod is not None
    return mod.probe(path, caps, create_vm)  # type: ignore[no-any-return]


@pytest.fixture
def kvm_dev() -> str:
    if not os.path.exists("/dev/kvm"):
        skip_or_fail("this host has no /dev/kvm")
    return "/dev/kvm"


@pytest.mark.parametrize("create_vm", [False, True])
def test_native_and_twin_agree_on_real_kvm(kvm_dev: str, create_vm: bool) -> None:
    native = _native_probe(kvm_dev, CAPS, create_vm)
    twin = kvm._probe_py(kvm_dev, CAPS, create_vm)
    assert native == twin
    open_err, api, values, mmap_size, create_err = native
    assert open_err == 0 and api == 12
    assert len(values) == len(CAPS)
    assert values[-1] == 0  # an unknown capability number is reported absent, not an error
    assert mmap_size > 0
    assert create_err == (0 if create_vm else -1)


@pytest.mark.parametrize("kind", ["missing", "devnull", "regular", "directory"])
def test_native_and_twin_agree_on_non_kvm_paths(tmp_path: Path, kind: str) -> None:
    path = {
        "missing": str(tmp_path / "nope"),
        "devnull": "/dev/null",
        "regular": str(tmp_path / "file"),
        "directory": str(tmp_path),
    }[kind]
    if kind == "regular":
        Path(path).write_bytes(b"not a device")
    native = _native_probe(path, CAPS, True)
    twin = kvm._probe_py(path, CAPS, True)
    assert native == twin
    assert native[1] != 12


def test_embedded_nul_rejected_by_both() -> None:
    require_native("kvm")
    mod = _native.load("kvm")
    assert mod is not None
    with pytest.raises(ValueError):
        mod.probe("/dev/kvm\0x", CAPS, False)
    with pytest.raises(ValueError):
        kvm._probe_py("/dev/kvm\0x", CAPS, False)


@pytest.mark.parametrize("native", [True, False])
def test_report_on_real_kvm(kvm_dev: str, native: bool) -> None:
    if native:
        require_native("kvm")
    rep = kvm.probe_kvm(kvm_dev, native=native)
    assert rep.ok, rep.detail
    assert rep.api_version == 12
    assert rep.missing_caps == []
    assert rep.max_vcpus is not None and rep.max_vcpus >= 1
    assert rep.vm_created is True
    assert "max" in rep.detail and "vCPUs" in rep.detail


@pytest.mark.parametrize(
    ("path", "needle", "remedy"),
    [
        ("/nonexistent/kvm", "does not exist", "modprobe"),
        ("/dev/null", "is not a KVM device", "--kvm-device"),
        ("/tmp", "is a directory", "--kvm-device"),
    ],
)
def test_report_on_bad_devices(path: str, needle: str, remedy: str) -> None:
    for native in (True, False):
        rep = kvm.probe_kvm(path, native=native)
        assert not rep.ok
        assert needle in rep.detail
        assert remedy in rep.remedy


def test_permission_denied_is_explained(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to drop privileges in a child")
    # A child that drops to an unprivileged uid cannot open a 0600 root-owned device.
    import subprocess
    import sys

    code = (
        "import os, fcntl; from nkudo.host import kvm; from nkudo import _native; _native.load('kvm');"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
        "r = kvm.probe_kvm('/dev/kvm'); print(r.ok); print(r.detail); print(r.remedy)"
    )
    st = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    if st is None or st.st_mode & 0o006:
        skip_or_fail("/dev/kvm missing or world-accessible on this host")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "False"
    assert "permission denied" in out[1]
    assert "kvm" in out[2]
