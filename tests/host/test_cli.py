"""`nkudo-edge check | version | hostfacts` as an operator runs them (real processes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nkudo.cli.options import CHECK_IDS as OPT_CHECK_IDS
from nkudo.host.checks import CHECK_IDS
from tests.conftest import skip_or_fail

EDGE = str(Path(sys.executable).parent / "nkudo-edge")


def run(
    *args: str, netns: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [EDGE, *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NKUDO_")}
    full_env.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=60, check=False)


@pytest.fixture
def fake_ch(tmp_path: Path) -> Path:
    """A stand-in binary that prints what `cloud-hypervisor --version` prints."""
    p = tmp_path / "cloud-hypervisor"
    p.write_text("#!/bin/sh\necho 'cloud-hypervisor v53.0'\n")
    p.chmod(0o755)
    return p


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


def check_json(*args: str, netns: str | None = None) -> tuple[int, dict[str, dict[str, object]]]:
    r = run("check", "--json", *args, netns=netns)
    assert r.stderr == "", r.stderr
    doc = json.loads(r.stdout)
    return r.returncode, {c["id"]: c for c in doc["checks"]}


def test_check_ids_are_the_same_list_everywhere() -> None:
    assert tuple(OPT_CHECK_IDS) == CHECK_IDS


def test_bridge_up_passes_and_everything_is_reported(netns_name: str, fake_ch: Path, tmp_path: Path) -> None:
    ip(netns_name, "link", "add", "br-test", "type", "bridge")
    ip(netns_name, "link", "set", "br-test", "up")
    rc, checks = check_json(
        "--bridge", "br-test", "--cloud-hypervisor-bin", str(fake_ch), "--min-disk-gib", "0.001",
        "--runtime-dir", str(tmp_path / "vms"), netns=netns_name,
    )  # fmt: skip
    assert list(checks) == list(CHECK_IDS)
    for c in checks.values():
        assert set(c) == {"id", "title", "status", "detail", "remedy", "duration_ms", "data"}
        assert c["status"] in ("pass", "warn", "fail", "skip")
        assert isinstance(c["detail"], str) and c["detail"]
        assert (c["remedy"] != "") == (c["status"] in ("warn", "fail"))
    assert checks["bridge"]["status"] == "pass"
    assert checks["bridge"]["data"]["kind"] == "bridge"  # type: ignore[index]
    assert checks["cloud_hypervisor"]["status"] == "pass"
    assert checks["cloud_hypervisor"]["data"]["version"] == "v53.0"  # type: ignore[index]
    assert checks["netbird"]["status"] == "skip"
    assert checks["kvm"]["status"] == "pass"
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert rc == (1 if failed else 0)


def test_all_pass_exits_zero_with_summary(netns_name: str, fake_ch: Path, tmp_path: Path) -> None:
    ip(netns_name, "link", "add", "br0", "type", "bridge")
    ip(netns_name, "link", "set", "br0", "up")
    r = run(
        "--state-dir", str(tmp_path / "state"), "check", "--cloud-hypervisor-bin", str(fake_ch),
        "--min-disk-gib", "0.001", "--min-memory-mib", "1", "--runtime-dir", str(tmp_path), netns=netns_name,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout
    assert "✓ KVM available" in r.stdout
    assert "✓ Bridge br0 exists" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("All checks passed! System is ready.")
    assert "\033[" not in r.stdout  # no colour when stdout is not a TTY


@pytest.mark.parametrize("setup", ["absent", "down", "not-a-bridge"])
def test_bridge_failures(netns_name: str, setup: str) -> None:
    if setup == "down":
        ip(netns_name, "link", "add", "br0", "type", "bridge")
    elif setup == "not-a-bridge":
        ip(netns_name, "link", "add", "br0", "type", "veth", "peer", "name", "br0p")
        ip(netns_name, "link", "set", "br0", "up")
    rc, checks = check_json("--bridge", "br0", netns=netns_name)
    assert rc == 1
    b = checks["bridge"]
    assert b["status"] == "fail"
    expected = {
        "absent": "no interface named br0",
        "down": "bridge br0 is down",
        "not-a-bridge": "not a bridge",
    }
    assert expected[setup] in str(b["detail"])
    assert b["remedy"]


def test_missing_and_non_kvm_devices_fail_cleanly(tmp_path: Path) -> None:
    for dev, needle in (("/nonexistent/kvm", "does not exist"), ("/dev/null", "not a KVM device")):
        rc, checks = check_json("--kvm-device", dev)
        assert rc == 1
        assert checks["kvm"]["status"] == "fail"
        assert needle in str(checks["kvm"]["detail"])
    r = run("check", "--kvm-device", str(tmp_path))
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert "✗ KVM available:" in r.stdout


def test_read_only_state_dir_fails(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root for a private mount namespace")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = f"mount -t tmpfs -o ro tmpfs {ro} && exec {EDGE} --state-dir {ro} check --json --skip kvm"
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True
    )
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 1
    assert checks["state_dir"]["status"] == "fail"
    assert "read-only file system" in checks["state_dir"]["detail"]
    assert checks["kvm"]["status"] == "skip"


def test_state_dir_warnings(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    r = run("--state-dir", str(d), "check", "--json")
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["state_dir"]["status"] == "warn"
    assert "world writable" in checks["state_dir"]["detail"]
    f = tmp_path / "file"
    f.write_text("x")
    r = run("--state-dir", str(f), "check", "--json")
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["state_dir"]["status"] == "fail"
    assert "not a directory" in checks["state_dir"]["detail"]
    assert not list(d.iterdir())  # the probe file was removed


@pytest.mark.parametrize(
    ("script", "needle"),
    [
        ("echo 'cloud-hypervisor v40.0'", "older than the supported minimum v48.0"),
        ("echo 'hello'", "gave no version"),
        ("exit 3", "gave no version (exit 3)"),
    ],
)
def test_cloud_hypervisor_versions(tmp_path: Path, script: str, needle: str) -> None:
    p = tmp_path / "ch"
    p.write_text(f"#!/bin/sh\n{script}\n")
    p.chmod(0o755)
    rc, checks = check_json("--cloud-hypervisor-bin", str(p))
    assert rc == 1
    assert checks["cloud_hypervisor"]["status"] == "fail"
    assert needle in str(checks["cloud_hypervisor"]["detail"])
    p.chmod(stat.S_IRUSR)
    rc, checks = check_json("--cloud-hypervisor-bin", str(p))
    assert rc == 1
    assert "not found or not executable" in str(checks["cloud_hypervisor"]["detail"])


def test_thresholds_fail_disk_and_memory() -> None:
    rc, checks = check_json("--min-disk-gib", "999999", "--min-memory-mib", "999999999")
    assert rc == 1
    assert checks["disk"]["status"] == "fail" and "minimum 999999 GiB" in str(checks["disk"]["detail"])
    assert checks["memory"]["status"] == "fail"


def test_netbird_enabled_but_missing_fails() -> None:
    r = run("check", "--json", "--netbird-enabled", env={"PATH": "/usr/bin:/bin"})
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["netbird"]["status"] == "fail"
    assert "netbird not found" in str(checks["netbird"]["detail"])


def test_skip_and_env_vars(netns_name: str) -> None:
    ip(netns_name, "link", "add", "brx", "type", "bridge")
    ip(netns_name, "link", "set", "brx", "up")
    r = run(
        "check", "--json", "--skip", "kvm", "--skip", "disk", netns=netns_name, env={"NKUDO_BRIDGE": "brx"}
    )
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["kvm"]["status"] == "skip" and checks["disk"]["status"] == "skip"
    assert checks["bridge"]["status"] == "pass"


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["check", "--no-such-flag"], {}, "No such option"),
        (["check", "--skip", "bogus"], {}, "bogus"),
        (["check", "--bridge", "this-name-is-way-too-long"], {}, "not a valid interface name"),
        (["check", "--bridge", "a/b"], {}, "not a valid interface name"),
        (["check", "--min-disk-gib", "lots"], {}, "--min-disk-gib"),
        (["--log-level", "loud", "version"], {}, "loud"),
        (["version"], {"NKUDO_LOG_FORMAT": "xml"}, "xml"),
        (["frobnicate"], {}, "No such command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    r = run(*args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize(
    "cmd",
    [[], ["version"], ["check"], ["hostfacts"], ["apply"], ["enroll"], ["run"], ["status"], ["unenroll"], ["renew"], ["verify-heartbeat"]],
)
def test_help_exits_zero(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "Usage:" in r.stdout
    if cmd == ["check"]:
        assert "NKUDO_BRIDGE" in r.stdout and "--skip" in r.stdout


def test_version_reports_native_and_twin() -> None:
    r = run("version", "--json")
    info = json.loads(r.stdout)
    mods = {m["name"]: m for m in info["native_modules"]}
    assert mods["kvm"]["native"] is True and mods["syscalls"]["native"] is True
    assert info["version"] and info["kernel"]["sysname"] == "Linux"
    r = run("version", "--json", env={"NKUDO_NATIVE": "0"})
    info = json.loads(r.stdout)
    assert all(
        not m["native"] and m["reason"] == "disabled by NKUDO_NATIVE=0" for m in info["native_modules"]
    )
    text = run("version", env={"NKUDO_NATIVE": "0"}).stdout
    assert "twin" in text and "kvm" in text


def test_twin_check_output_matches_native(netns_name: str) -> None:
    """The whole check run gives the same statuses with the twins forced."""
    ip(netns_name, "link", "add", "br0", "type", "bridge")
    native = run("check", "--json", netns=netns_name)
    twin = run("check", "--json", netns=netns_name, env={"NKUDO_NATIVE": "0"})
    a = {c["id"]: (c["status"], c["detail"]) for c in json.loads(native.stdout)["checks"]}
    b = {c["id"]: (c["status"], c["detail"]) for c in json.loads(twin.stdout)["checks"]}
    a.pop("disk"), b.pop("disk"), a.pop("memory"), b.pop("memory")  # free space/memory move between runs
    assert a == b
    assert native.returncode == twin.returncode


def test_hostfacts_sees_bridge_in_netns(netns_name: str) -> None:
    ip(netns_name, "link", "add", "brf", "type", "bridge")
    ip(netns_name, "link", "add", "dm0", "type", "veth", "peer", "name", "dm0p")
    ip(netns_name, "link", "set", "dm0", "master", "brf")
    ip(netns_name, "link", "set", "dm0", "mtu", "1400")
    r = run("hostfacts", netns=netns_name)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    for key in (
        "hostname",
        "os",
        "kernel",
        "arch",
        "cpu",
        "memory",
        "disks",
        "kvm",
        "interfaces",
        "bridges",
        "cgroup",
        "agent_version",
    ):
        assert key in facts
    assert facts["bridges"] == ["brf"]
    ifs = {i["name"]: i for i in facts["interfaces"]}
    assert ifs["dm0"]["master"] == "brf" and ifs["dm0"]["mtu"] == 1400
    assert ifs["dm0"]["mac"] and len(ifs["dm0"]["mac"]) == 17
    assert facts["kvm"]["usable"] is True
    assert facts["memory"]["total_bytes"] > 0 and facts["cpu"]["count"] >= 1
    assert [d["path"] for d in facts["disks"]][-1] == "/"


def test_fast_path_and_click_agree(capsys: pytest.CaptureFixture[str]) -> None:
    """The start-up fast path and click produce the same output for the same argv."""
    from nkudo.cli import entry
    from nkudo.cli.options import fast_parse

    for argv in (["version", "--json"], ["check", "--json", "--skip", "kvm", "--bridge", "nonexist0"]):
        assert fast_parse(argv) is not None
        rc1 = entry.main(argv)
        out1 = capsys.readouterr().out
        rc2 = entry.main(argv, force_click=True)
        out2 = capsys.readouterr().out
        assert rc1 == rc2
        d1, d2 = json.loads(out1), json.loads(out2)
        if argv[0] == "check":
            d1 = {c["id"]: c["status"] for c in d1["checks"]}
            d2 = {c["id"]: c["status"] for c in d2["checks"]}
        assert d1 == d2
    assert fast_parse(["check", "--help"]) is None
    assert fast_parse(["check", "--bridge", "a/b"]) is None
    assert fast_parse(["hostfacts"]) is None
