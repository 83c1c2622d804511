"""The guest-execution smoke test: native and twin agree, real /dev/kvm runs the guest, bad devices explain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nkudo import _native
from nkudo.host import checks, kvm
from tests.conftest import require_native, skip_or_fail


@pytest.fixture
def kvm_dev() -> str:
    if not os.path.exists("/dev/kvm"):
        skip_or_fail("this host has no /dev/kvm")
    return "/dev/kvm"


def _native_smoke(path: str) -> kvm.SmokeRaw:
    require_native("kvm")
    mod = _native.load("kvm")
    assert mod is not None
    return mod.smoke(path)  # type: ignore[no-any-return]


def test_native_and_twin_run_the_guest_identically(kvm_dev: str) -> None:
    native = _native_smoke(kvm_dev)
    twin = kvm._smoke_py(kvm_dev)
    assert native == twin
    # IO exit: direction out (1), 1 byte, port 0x10, value 0x4e; then HLT.
    assert native == ("", 0, (kvm.KVM_EXIT_IO, kvm.KVM_EXIT_HLT), (1, 1, 0x10, 0x4E))


@pytest.mark.parametrize("kind", ["missing", "devnull", "directory", "regular"])
def test_native_and_twin_agree_on_non_kvm_paths(tmp_path: Path, kind: str) -> None:
    path = {"missing": str(tmp_path / "nope"), "devnull": "/dev/null", "directory": str(tmp_path),
            "regular": str(tmp_path / "f")}[kind]  # fmt: skip
    if kind == "regular":
        Path(path).write_bytes(b"x")
    native = _native_smoke(path)
    assert native == kvm._smoke_py(path)
    assert native[0] in ("open", "create_vm") and native[1] != 0 and native[2] == ()


def test_embedded_nul_rejected_by_both() -> None:
    require_native("kvm")
    mod = _native.load("kvm")
    assert mod is not None
    with pytest.raises(ValueError):
        mod.smoke("/dev/kvm\0x")
    with pytest.raises(ValueError):
        kvm._smoke_py("/dev/kvm\0x")


@pytest.mark.parametrize("native", [True, False])
def test_report_on_real_kvm(kvm_dev: str, native: bool) -> None:
    if native:
        require_native("kvm")
    rep = kvm.smoke_test(kvm_dev, native=native)
    assert rep.ok, rep.detail
    assert rep.exits == ["IO", "HLT"] and rep.io == {"direction": 1, "size": 1, "port": 16, "value": 78}
    assert 0 < rep.duration_ms < 1000
    assert "OUT 0x10 then HLT" in rep.detail and rep.remedy == ""


def test_report_on_a_device_that_is_not_kvm() -> None:
    rep = kvm.smoke_test("/dev/null")
    assert not rep.ok and rep.stage == "create_vm"
    assert "refused to set up a test VM" in rep.detail and rep.remedy


def test_wrong_guest_behaviour_fails_with_the_nested_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a broken nested host answers: KVM_RUN returns, but with a failed entry instead of our two exits.
    monkeypatch.setattr(kvm, "raw_smoke", lambda path, native=None: ("", 0, (9,), (-1, -1, -1, -1)))
    rep = kvm.smoke_test("/dev/kvm")
    assert not rep.ok and rep.exits == ["FAIL_ENTRY"]
    assert "did not run as written" in rep.detail and "nested" in rep.remedy


def test_check_reports_the_item_with_its_time(kvm_dev: str) -> None:
    res = checks.check_kvm_exec(checks.CheckOptions(kvm_device=kvm_dev))
    assert res.id == "kvm_exec" and res.title == "KVM can execute guest code"
    assert res.status == checks.PASS, res.detail
    assert res.data["exits"] == ["IO", "HLT"] and float(res.data["smoke_ms"]) > 0  # type: ignore[arg-type]


def test_check_skips_the_item_without_kvm() -> None:
    res = checks.check_kvm_exec(checks.CheckOptions(kvm_device="/nonexistent/kvm"))
    assert res.status == checks.SKIP


def test_cli_check_json_lists_the_item_and_qemu() -> None:
    edge = str(Path(sys.executable).parent / "nkudo-edge")
    out = subprocess.run([edge, "check", "--json"], capture_output=True, text=True, check=False).stdout
    items = {c["id"]: c for c in json.loads(out)["checks"]}
    assert list(items).index("kvm_exec") == list(items).index("kvm") + 1
    assert items["kvm_exec"]["duration_ms"] > 0
    q = items["qemu"]
    if checks.which("qemu-system-x86_64"):
        assert q["status"] == "pass" and q["data"]["version"][0].isdigit()
    else:
        assert q["status"] == "skip"


def test_qemu_version_read_without_running_it(tmp_path: Path) -> None:
    fake = tmp_path / "qemu"
    fake.write_bytes(b"\x7fELF...\0QEMU emulator version 9.1.0 (v9.1.0)\0rest")
    assert checks.qemu_version_from_binary(str(fake)) == "9.1.0"
    fake.write_bytes(b"\x7fELF no banner")
    assert checks.qemu_version_from_binary(str(fake)) is None
