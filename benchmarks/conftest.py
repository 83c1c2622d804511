"""Helpers for the performance gates: one way to time, one record of a run.

Every gate times its body with pytest-benchmark's ``benchmark`` fixture, so the
record of a run is pytest-benchmark's JSON (``make bench`` writes
``.benchmarks/run-<commit>.json`` with ``--benchmark-json``; its ``commit_info``
names the commit measured and whether the tree was dirty). Each gate puts its
ratio and the inputs of that ratio in ``benchmark.extra_info`` (:func:`record`),
so the closing notes quote the JSON rather than a hand-written log.

A ratio gate compares two or more things in the same run, and a test can use the
fixture only once. :func:`time_sides` therefore times the gated side with
``benchmark.pedantic`` and the comparison sides in the fixture's ``setup`` hook,
round-robin, with the fixture's own timer: every side sees the same machine
noise and the same clock, and the primary side's statistics are the fixture's.
:func:`time_alongside` times a reported (not gated) figure with that same timer.

Every measured operation must prove it succeeded on every run (:func:`checked`,
:func:`command_runner`): a command that fails fast would otherwise "pass" a
speed gate precisely because it did no work.
"""

from __future__ import annotations

import gc
import re
import statistics
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.conftest import ci_skip_guard

T = TypeVar("T")
# pytest-benchmark's fixture has no type annotations; the helpers below are its typed face.
Benchmark = Any

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
    cwd: Path | None = None,
) -> Callable[[], subprocess.CompletedProcess[str]]:
    """A callable that runs ``argv`` once and fails unless it exited with one of ``ok_codes``.

    ``stdout_pattern`` (a regex searched in stdout) guards commands whose exit
    code alone is ambiguous, e.g. ``check`` exits 1 both for "a check failed"
    (a complete run) and for a crash (a traceback and no report).
    """
    args = [str(a) for a in argv]
    pattern = re.compile(stdout_pattern) if stdout_pattern is not None else None

    def run() -> subprocess.CompletedProcess[str]:
        r = subprocess.run(args, capture_output=True, text=True, check=False, env=env, cwd=cwd)
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


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one measured side: min, median and p99 over ``rounds`` rounds."""

    min: float
    median: float
    p99: float
    rounds: int

    @classmethod
    def of(cls, samples: Sequence[float], per_call: int = 1) -> Timing:
        s = sorted(x / per_call for x in samples)
        if not s:
            raise GateRunFailed("no timed rounds: the side was never measured")
        return cls(s[0], statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))], len(s))

    @property
    def median_ms(self) -> float:
        return round(self.median * 1e3, 3)

    @property
    def median_us(self) -> float:
        return round(self.median * 1e6, 2)


def _timer(benchmark: Benchmark) -> Callable[[], float]:
    """The clock the fixture times with (``--benchmark-timer`` or the test's ``benchmark`` mark)."""
    timer: Callable[[], float] = benchmark._timer
    return timer


def _require_enabled(benchmark: Benchmark) -> None:
    if benchmark.disabled:  # --benchmark-disable, or xdist: the fixture runs once and times nothing
        pytest.skip("benchmark timing is disabled: a gate without figures cannot pass or fail")


def fixture_timing(benchmark: Benchmark, per_call: int = 1) -> Timing:
    """The fixture's own statistics of the primary side, per call."""
    stats = benchmark.stats
    if stats is None:
        raise GateRunFailed("the benchmark fixture recorded no timing")
    return Timing.of(stats.stats.data, per_call)


def time_sides(
    benchmark: Benchmark,
    sides: Mapping[str, Callable[[], object]],
    *,
    primary: str,
    rounds: int,
    warmup_rounds: int = 2,
    per_call: int = 1,
    between: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time ``sides[primary]`` with ``benchmark.pedantic`` and the other sides interleaved with it.

    Each round runs every other side once (in the fixture's untimed ``setup``,
    timed here with the fixture's clock) and then the primary side (timed by the
    fixture). ``between`` runs untimed after every timed call of any side (e.g.
    reaping a child). ``per_call`` divides a round that makes that many calls.
    An exception from any side (:class:`GateRunFailed`) fails the gate.
    """
    _require_enabled(benchmark)
    timer = _timer(benchmark)
    disable_gc = bool(getattr(benchmark, "_disable_gc", False))
    others = {k: fn for k, fn in sides.items() if k != primary}
    samples: dict[str, list[float]] = {k: [] for k in others}
    setups = 0

    def setup() -> None:
        nonlocal setups
        keep = setups >= warmup_rounds
        setups += 1
        for k, fn in others.items():
            gc_was = gc.isenabled()
            if disable_gc:
                gc.disable()
            try:
                t0 = timer()
                fn()
                dt = timer() - t0
            finally:
                if gc_was:
                    gc.enable()
            if between is not None:
                between()
            if keep and len(samples[k]) < rounds:
                samples[k].append(dt)

    benchmark.pedantic(
        sides[primary],
        setup=setup,
        teardown=between,
        rounds=rounds,
        warmup_rounds=warmup_rounds,
    )
    out = {primary: fixture_timing(benchmark, per_call)}
    out.update({k: Timing.of(v, per_call) for k, v in samples.items()})
    return {k: out[k] for k in sides}


def time_alongside(
    benchmark: Benchmark, fn: Callable[[], object], *, rounds: int, warmup_rounds: int = 0, per_call: int = 1
) -> Timing:
    """Time a reported figure next to the gate, with the fixture's clock (the fixture is used once)."""
    _require_enabled(benchmark)
    timer = _timer(benchmark)
    for _ in range(warmup_rounds):
        fn()
    samples: list[float] = []
    for _ in range(rounds):
        t0 = timer()
        fn()
        samples.append(timer() - t0)
    return Timing.of(samples, per_call)


def time_window(benchmark: Benchmark, fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` once under the fixture (one round): its result and its wall seconds.

    For gates whose figures are not a repeatable timing (a soak, a latency
    distribution, numbers measured in another process): the fixture times the
    window the figures were taken over, and the figures go in ``extra_info``.
    """
    _require_enabled(benchmark)
    result: T = benchmark.pedantic(fn, rounds=1)
    return result, fixture_timing(benchmark).median


def record(benchmark: Benchmark, gate: str, **numbers: object) -> None:
    """Put a gate's figures (its ratio and the inputs of it) in the run's record, and print them."""
    benchmark.extra_info["gate"] = gate
    benchmark.extra_info.update(numbers)
    print(f"\nGATE {gate}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
