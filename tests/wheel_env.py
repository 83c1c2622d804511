"""Build the nkudo wheel once per test session and install it into brand-new virtualenvs, offline.

Why offline: a test must not depend on the package registry. Dependencies come from the
local wheelhouse that ``make wheelhouse`` writes (``dist/wheelhouse/``: the agent's
dependency closure; ``extras/``: what the control-plane and simulator extras add), installed
with ``--no-index``. That wheelhouse is built once with the registry (``make test`` and CI do
it before pytest); rebuilding wheels from the project venv's installed distributions was the
alternative, but an installed distribution is not a wheel (no RECORD hashes to trust, files
patched by editable installs) and re-packing it would test our packer, not what ships.

Why once per session: compiling the Cython and cffi modules is the slow part; every test
of the built artifact shares the one wheel (:func:`agent_wheel`).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "dist" / "wheelhouse"
EXTRAS_WHEELHOUSE = WHEELHOUSE / "extras"
#: Distributions of the agent's closure that are not declared directly: each is a dependency of a
#: declared one (cffi and cryptography need pycparser). A new one is a new package on every host: add it
#: here only after deciding it is acceptable.
TRANSITIVE = frozenset({"pycparser"})
#: What a venv brings itself (``ensurepip``), not the wheel.
BOOTSTRAP = frozenset({"pip", "setuptools", "wheel"})


def offline_env() -> dict[str, str]:
    """Environment for pip that can reach no index: no user/site config, ``--no-index`` forced."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PIP_", "NKUDO_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def requirement_name(req: str) -> str:
    """The distribution name of a requirement string such as ``psycopg[binary]>=3.1; sys_platform == 'linux'``."""
    for stop in "[<>=!~; (":
        req = req.split(stop, 1)[0]
    return canonical(req.strip())


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def declared(extra: str | None = None) -> frozenset[str]:
    """Distribution names of the agent's dependencies, or of one extra."""
    project = pyproject()
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]  # type: ignore[index]
    return frozenset(requirement_name(r) for r in reqs)  # type: ignore[union-attr]


@functools.cache
def session_dir() -> Path:
    """One scratch directory per test session for the built artifacts (removed at exit)."""
    d = Path(tempfile.mkdtemp(prefix="nkudo-wheel-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def agent_wheel() -> Path:
    """The wheel built from this checkout's sdist, once per session (``packaging/build_wheel.py``, as ``make wheel``)."""
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "build_wheel.py"), str(session_dir())],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def session_sdist() -> Path:
    """The sdist :func:`agent_wheel` was built from."""
    agent_wheel()
    (sdist,) = session_dir().glob("nkudo-*.tar.gz")
    return sdist


def build_wheel(dest: Path) -> Path:
    """A copy of the session's wheel in ``dest``."""
    return Path(shutil.copy2(agent_wheel(), dest))


def wheelhouse() -> Path:
    """The dependency wheelhouse, or skip (fail under CI) when ``make wheelhouse`` has not run."""
    if not any(WHEELHOUSE.glob("*.whl")) or not EXTRAS_WHEELHOUSE.is_dir():
        skip_or_fail(f"no local wheelhouse in {WHEELHOUSE}: run `make wheelhouse` once (it uses the registry)")
    return WHEELHOUSE


def new_venv(env_dir: Path) -> Path:
    """A new venv (pip only, no access to this checkout or the project venv); returns its bin/."""
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    return env_dir / "bin"


def pip_install_offline(bin_dir: Path, *requirements: str, cwd: Path) -> None:
    """``pip install --no-index`` from the local wheelhouse only; fails on anything it would need to fetch."""
    house = wheelhouse()
    r = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--no-index", "--find-links", str(house),
         "--find-links", str(house / "extras"), *requirements],
        capture_output=True, text=True, cwd=cwd, env=offline_env(),
    )  # fmt: skip
    assert r.returncode == 0, f"offline install of {requirements} failed (is {house} stale? `make wheelhouse`):\n{r.stderr[-3000:]}"


def fresh_venv_with_wheel(workdir: Path, wheel: Path | None = None, extras: str = "") -> Path:
    """Return the bin/ directory of a new venv holding only the wheel (and its dependencies), installed offline."""
    bin_dir = new_venv(workdir / "venv")
    whl = wheel or agent_wheel()
    pip_install_offline(bin_dir, f"nkudo[{extras}] @ {whl.as_uri()}" if extras else str(whl), cwd=workdir)
    return bin_dir


def installed(bin_dir: Path) -> frozenset[str]:
    """Canonical names of the distributions installed in the venv of ``bin_dir``."""
    r = subprocess.run([str(bin_dir / "pip"), "list", "--format=json"], capture_output=True, text=True,
                       check=True, env=offline_env())  # fmt: skip
    return frozenset(canonical(d["name"]) for d in json.loads(r.stdout))
