"""Build the nkudo wheel and install it into a brand-new virtualenv (no source tree on its path)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(dest), str(ROOT)],
        check=True,
        cwd=dest,
    )
    wheels = sorted(dest.glob("nkudo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def fresh_venv_with_wheel(workdir: Path) -> Path:
    """Return the bin/ directory of a new venv that has only the built wheel (and its dependencies)."""
    wheel = build_wheel(workdir)
    env_dir = workdir / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], check=True, cwd=workdir)
    return bin_dir
