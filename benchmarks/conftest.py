"""Helpers for ratio gates: both sides measured in the same run, numbers recorded.

Every gate appends its numbers to ``.benchmarks/gates.jsonl`` (and prints them)
so closing notes quote what was measured, with the command that produced it and
the commit it measured (``commit``, ``dirty``).

Every measured operation must prove it succeeded on every run (:func:`checked`,
:func:`command_runner`): a command that fails fast would otherwise "pass" a
speed gate precisely because it did no work.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.conftest import ci_skip_guard

ROOT = Path(__file__).resolve().parent.parent
GATES = ROOT / ".benchmarks" / "gates.jsonl"
T = TypeVar("T")

pytest_runtest_makereport = ci_skip_guard


class GateRunFailed(AssertionError):
    """A measured operation did not succeed, so its timing means nothing."""


def checked(fn: Callable[[], T], ok: Callable[[Any], object], what: str) -> Callable[[], T]:
    """``fn`` that raises :class:`GateRunFailed` after any call whose result ``ok`` rejects."""

    def run() -> T:
        result = fn()
        if not ok(result):
            raise GateRunFailed(f"{what} did not succeed: {result!r:.500}")
        return result

    return run


def command_runner(
    argv: Sequence[str],
    *,
    ok_codes: tuple[int, ...] = (0,),
    stdout_pattern: str | None = None,
    env: dict[str, str] | None = None,
) -> Callable[[], subprocess.CompletedProcess[str]]:
    """A callable that runs ``argv`` once and fails unless it exited with one of ``ok_codes``.

    ``stdout_pattern`` (a regex searched in stdout) guards commands whose exit
    code alone is ambiguous, e.g. ``check`` exits 1 both for "a check failed"
    (a complete run) and for a crash (a traceback and no report).
    """
    args = [str(a) for a in argv]
    pattern = re.compile(stdout_pattern) if stdout_pattern is not None else None

    def run() -> subprocess.CompletedProcess[str]:
        r = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
        if r.returncode not in ok_codes:
            raise GateRunFailed(
                f"{' '.join(args)} exited {r.returncode} (expected {ok_codes}): {r.stderr[-1000:]}"
            )
        if pattern is not None and not pattern.search(r.stdout):
            raise GateRunFailed(
                f"{' '.join(args)} printed no {pattern.pattern!r}: {r.stdout[-500:]} {r.stderr[-1000:]}"
            )
        return r

    return run


@functools.cache
def commit_info(root: Path = ROOT) -> dict[str, object]:
    """The commit a gate measured and whether the tree had uncommitted changes.

    ``commit`` and ``dirty`` are None outside a git checkout (e.g. an unpacked
    sdist): the numbers are still recorded, but cannot be tied to a commit.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False, timeout=30
        )
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def timed(fn: Callable[[], object], *, rounds: int, warmup: int = 3, per_round: int = 1) -> dict[str, float]:
    """Per-call seconds over ``rounds`` rounds (each ``per_round`` calls): min/median/p99."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        samples.append((time.perf_counter() - t0) / per_round)
    samples.sort()
    return {
        "min": samples[0],
        "median": statistics.median(samples),
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "rounds": float(rounds),
    }


def interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Measure several callables round-robin so machine noise hits them equally."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for k, s in samples.items():
        s.sort()
        out[k] = {"min": s[0], "median": statistics.median(s), "p99": s[min(len(s) - 1, int(len(s) * 0.99))]}
    return out


def record_gate(name: str, **numbers: object) -> None:
    GATES.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "gate": name,
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
        **commit_info(),
        **numbers,
    }
    with GATES.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    print(f"\nGATE {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.fixture
def gate() -> Callable[..., None]:
    return record_gate
