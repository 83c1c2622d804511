"""Helpers for ratio gates: both sides measured in the same run, numbers recorded.

Every gate appends its numbers to ``.benchmarks/gates.jsonl`` (and prints them)
so closing notes quote what was measured, with the command that produced it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

GATES = Path(__file__).resolve().parent.parent / ".benchmarks" / "gates.jsonl"


def timed(fn: Callable[[], object], *, rounds: int, warmup: int = 3, per_round: int = 1) -> dict[str, float]:
    """Per-call seconds over ``rounds`` rounds (each ``per_round`` calls): min/median/p99."""
    for _ in range(warmup):
        fn()
    samples = []
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
    out = {}
    for k, s in samples.items():
        s.sort()
        out[k] = {"min": s[0], "median": statistics.median(s), "p99": s[min(len(s) - 1, int(len(s) * 0.99))]}
    return out


def record_gate(name: str, **numbers: object) -> None:
    GATES.parent.mkdir(parents=True, exist_ok=True)
    line = {"gate": name, "ts": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), **numbers}
    with GATES.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    print(f"\nGATE {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.fixture
def gate() -> Callable[..., None]:
    return record_gate
