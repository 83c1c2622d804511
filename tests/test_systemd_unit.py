"""The shipped systemd unit: systemd's own verifier, strict key checks, and a real capability check.

This machine has no running systemd (no PID 1 manager), so the unit cannot be started here. What runs:

* ``systemd-analyze verify`` (systemd's parser and semantic checks: unknown directives, bad values, missing
  executables) on the unit with ExecStart pointed at this checkout's ``nkudo-edge``;
* ``systemd-analyze security --offline`` with an exposure threshold, so a later edit cannot quietly drop
  the hardening;
* a strict parse of the unit asserting every required directive and value, and that no capability beyond
  those the agent needs slipped in;
* the capability claim itself: in a fresh network namespace, an unprivileged uid holding only the unit's
  ambient capabilities creates the bridge and a TAP with the agent's own code, and a child process (standing
  in for the VMM) attaches to that TAP and configures it as Cloud Hypervisor does; without the capability
  both are refused;
* ``systemd-sysusers`` creating the user and its kvm membership in a scratch root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nkudo.cli.options import COMMAND_OPTS, GLOBAL_OPTS
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "packaging" / "systemd"
UNIT = PKG / "nkudo-edge.service"
EDGE_BIN = Path(sys.executable).parent / "nkudo-edge"

#: Directives that may legitimately appear more than once.
MULTI = {"DeviceAllow", "ExecStart", "ReadWritePaths", "SystemCallFilter", "Environment", "EnvironmentFile"}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd.syntax(7): sections, ``Key=Value``, ``#``/``;`` comments, ``\\`` continuations. Strict."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert re.fullmatch(r"\[[A-Za-z]+\]", line), f"line {n}: bad section header {line!r}"
            name = line[1:-1]
            assert name not in sections, f"line {n}: section {name} repeated"
            current = sections[name] = []
            continue
        assert current is not None, f"line {n}: directive outside a section"
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert m, f"line {n}: not Key=Value: {line!r}"
        current.append((m.group(1), m.group(2).strip()))
    assert not pending, "file ends in a line continuation"
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    vs = values(section, key)
    assert len(vs) == 1, f"{key} must appear exactly once, found {vs}"
    return vs[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def test_unit_has_the_required_directives(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    for key, _ in svc:
        if key not in MULTI:
            one(svc, key)  # no accidental duplicates (systemd would silently take the last one)

    assert one(svc, "ExecStart") == "/usr/local/bin/nkudo-edge run"
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "KillMode") == "process"  # VMMs survive agent restarts
    assert one(svc, "EnvironmentFile") == "-/etc/default/nkudo-edge"
    assert one(svc, "StateDirectory") == "nkudo-edge"
    assert values(svc, "ReadWritePaths") == ["/var/lib/nkudo-edge"]
    for key, want in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "OOMPolicy": "continue",  # one OOM-killed guest must not stop the agent
        "User": "nkudo-edge",
        "SupplementaryGroups": "kvm",
    }.items():
        assert one(svc, key) == want, key
    assert sorted(values(svc, "DeviceAllow")) == ["/dev/kvm rw", "/dev/net/tun rw"]

    # Capabilities: exactly CAP_NET_ADMIN, ambient within the bounding set.
    assert one(svc, "CapabilityBoundingSet").split() == ["CAP_NET_ADMIN"]
    assert one(svc, "AmbientCapabilities").split() == ["CAP_NET_ADMIN"]
    assert "CAP_SYS_ADMIN" not in " ".join(v for _, v in svc)

    # Things that would break the VMs if someone "hardened" further.
    for forbidden in ("PrivateDevices", "PrivateNetwork", "PrivateUsers", "MemoryMax", "ProcSubset", "DynamicUser"):
        assert not values(svc, forbidden), f"{forbidden} breaks the agent (see packaging/systemd/README.md)"
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_every_default_path_of_run_is_writable_in_the_unit(unit: dict[str, list[tuple[str, str]]]) -> None:
    """The CLI's defaults and the unit's one writable tree must not drift apart."""
    rw = values(unit["Service"], "ReadWritePaths")
    paths: list[str] = []
    for opt in (*GLOBAL_OPTS, *COMMAND_OPTS["run"]):
        if opt.kind == "path" and opt.default:
            paths.extend(opt.default if isinstance(opt.default, tuple) else [opt.default])
    assert len(paths) >= 5, paths  # state, pki, runtime, snapshots, images
    for p in paths:
        assert any(os.path.commonpath([p, r]) == r for r in rw), f"{p} is outside {rw}"


def test_environment_file_example_names_only_real_variables() -> None:
    known = {o.envvar for o in (*GLOBAL_OPTS, *COMMAND_OPTS["run"]) if o.envvar}
    named = set(re.findall(r"^#?(NKUDO_[A-Z_]+)=", (PKG / "nkudo-edge.default").read_text(), re.M))
    assert named, "the example names no variable"
    assert named <= known, f"not options of `nkudo-edge run`: {sorted(named - known)}"
    assert "NKUDO_METRICS_ADDR" in named


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        print("SKIP: systemd-analyze not installed (apt-get install systemd); strict parse tests still ran")
        skip_or_fail("systemd-analyze not installed (apt-get install systemd)")
    return exe


def _unit_for_this_checkout(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart at this checkout's binary (verify checks that it is executable)."""
    assert EDGE_BIN.exists(), EDGE_BIN
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/nkudo-edge run", f"ExecStart={EDGE_BIN} run")
    assert f"ExecStart={EDGE_BIN} run" in text
    out = tmp_path / "nkudo-edge.service"
    out.write_text(text)
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _analyze()
    unit = _unit_for_this_checkout(tmp_path)
    p = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), p.stdout + p.stderr
    # And the verifier is not vacuous: a typo'd directive is reported.
    bad = tmp_path / "bad" / "nkudo-edge.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("KillMode=process", "KillModee=process"))
    p = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True, timeout=120)
    assert "KillModee" in p.stderr, p.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    exe = _analyze()
    unit = _unit_for_this_checkout(tmp_path)
    p = subprocess.run(
        # --threshold is on the 0-100 scale; the printed level is that divided by 10.
        [exe, "security", "--offline=yes", "--threshold=30", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=120,
    )
    if "Unknown option" in p.stderr or "unrecognized option" in p.stderr:
        skip_or_fail(f"this systemd-analyze has no offline security mode: {p.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr
    assert float(m.group(1)) <= 3.0 and p.returncode == 0, p.stdout[-2000:]


def test_sysusers_creates_the_user_in_kvm(tmp_path: Path) -> None:
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        print("SKIP: systemd-sysusers not installed")
        skip_or_fail("systemd-sysusers not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    conf = PKG / "sysusers.d" / "nkudo-edge.conf"
    p = subprocess.run([exe, f"--root={root}", str(conf)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc" / "passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc" / "group").read_text().splitlines()}
    user = passwd["nkudo-edge"]
    assert 0 < int(user[2]) < 1000 and user[5] == "/var/lib/nkudo-edge" and user[6] == "/usr/sbin/nologin"
    assert "nkudo-edge" in groups["kvm"][3].split(",")
    assert groups["nkudo-edge"][2] == user[3]


# ------------------------------------------------------------------ the capability set really suffices

_AGENT = """
import os, sys
from nkudo.net.hostnet import open_backend
net = open_backend("twin")
net.ensure_bridge("br0", create=True)
link = net.create_tap("vm-cap", 0, bridge="br0")
print("TAP", link.name, os.getuid())
"""

_VMM = """
import fcntl, os, socket, struct, sys
from nkudo.net import rtnl
name = sys.argv[1]
fd = os.open("/dev/net/tun", os.O_RDWR)
# Cloud Hypervisor's open_tap: attach to the named persistent TAP, then configure and enable it with
# SIOCSIF* ioctls (flags/MTU/MAC), which the kernel allows only with CAP_NET_ADMIN.
fcntl.ioctl(fd, rtnl.TUNSETIFF, rtnl.pack_tun_ifreq(name, rtnl.IFF_TAP | rtnl.IFF_NO_PI | rtnl.IFF_VNET_HDR))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
req = struct.pack("16sh22x", name.encode(), 0)
flags = struct.unpack("16sh22x", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
try:
    fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", name.encode(), flags | 1))  # SIOCSIFFLAGS, IFF_UP
except OSError as exc:
    print("REFUSED", exc.errno)
else:
    print("CONFIGURED")
"""


def _caps(unit: dict[str, list[tuple[str, str]]]) -> str:
    names = one(unit["Service"], "AmbientCapabilities").split()
    return ",".join("+" + n.removeprefix("CAP_").lower() for n in names)


def _as_unit_user(ns: str, caps: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` the way the unit runs the agent: unprivileged uid, only ``caps``, no new privileges.

    uid 65534 stands in for the nkudo-edge user; the system python (readable by that uid) runs the
    checkout's sources, pure Python (the netlink twin), inside network namespace ``ns``.
    """
    cap_args = [f"--inh-caps=-all{',' + caps if caps else ''}", f"--ambient-caps=-all{',' + caps if caps else ''}"]
    return subprocess.run(
        [
            "ip", "netns", "exec", ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            *cap_args, f"--bounding-set=-all{',' + caps if caps else ''}", "--no-new-privs",
            "env", f"PYTHONPATH={ROOT / 'src'}", "NKUDO_NATIVE=0", "/usr/bin/python3", "-c", code, *args,
        ],
        capture_output=True, text=True, timeout=60,
    )


def test_the_units_capabilities_are_enough_and_needed(unit: dict[str, list[tuple[str, str]]]) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to make a network namespace and switch uid")
    for tool in ("ip", "setpriv", "/usr/bin/python3"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} not installed")
    caps = _caps(unit)
    assert caps == "+net_admin"
    ns = f"nkt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        probe = _as_unit_user(ns, "", "import nkudo.net.hostnet")
        if probe.returncode != 0:  # e.g. a checkout under /root (0700): uid 65534 cannot import it
            print(f"SKIP: the checkout at {ROOT} is not importable by an unprivileged uid: {probe.stderr[-300:]}")
            skip_or_fail(f"the checkout at {ROOT} is not importable by an unprivileged uid")
        # Without the capability the agent cannot build its network (the negative control).
        denied = _as_unit_user(ns, "", _AGENT)
        assert denied.returncode != 0 and "NET_PERMISSION_DENIED" in denied.stderr, denied.stdout + denied.stderr
        # With exactly the unit's capabilities it can, as a non-root uid.
        agent = _as_unit_user(ns, caps, _AGENT)
        assert agent.returncode == 0, agent.stderr[-2000:]
        tap, uid = agent.stdout.split()[-2:]
        assert uid == "65534"
        links = subprocess.run(["ip", "-n", ns, "-d", "link", "show", tap], capture_output=True, text=True, check=True)
        assert "master br0" in links.stdout and "tap" in links.stdout
        # The VMM inherits the ambient capability and can configure the TAP as Cloud Hypervisor does;
        # without it, it is refused (EPERM).
        vmm = _as_unit_user(ns, caps, _VMM, tap)
        assert vmm.stdout.strip() == "CONFIGURED", vmm.stdout + vmm.stderr[-2000:]
        vmm = _as_unit_user(ns, "", _VMM, tap)
        assert vmm.stdout.strip() == "REFUSED 1", vmm.stdout + vmm.stderr[-2000:]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
