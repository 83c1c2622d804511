"""Benchmark gates: measured only on successful runs, timed one way, recorded with the commit.

Issue 10 item 2: the start-up gate used to time ``nkudo-edge version``/``check``
without looking at their exit status, so a command that crashed at once "passed"
as fast. Issue 11 (benchmarks, one way to time): every gate times its body with
pytest-benchmark's ``benchmark`` fixture, and the record of a run is
pytest-benchmark's JSON (with ``commit_info``), written by ``make bench``.
These tests run the gates' own measuring helpers on real (tiny) commands and a
real pytest-benchmark run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from benchmarks import conftest as bench
from benchmarks.test_startup_bench import startup_commands

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_FAILED = "2 checks failed, 3 warnings. Fix the items marked ✗ before enrolling this host."


def _fake_bin(tmp_path: Path, version: tuple[int, str], check: tuple[int, str]) -> Path:
    """A bin dir with the real python and an ``nkudo-edge`` that exits/prints as told."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "python").symlink_to(sys.executable)
    script = (
        "#!/bin/sh\n"
        f'if [ "$1" = version ]; then printf "%s\\n" {json.dumps(version[1])}; exit {version[0]}; fi\n'
        f'if [ "$1" = check ]; then printf "%s\\n" {json.dumps(check[1])}; exit {check[0]}; fi\n'
        "exit 64\n"
    )
    (d / "nkudo-edge").write_text(script)
    (d / "nkudo-edge").chmod(0o755)
    return d


def test_command_runner_fails_on_nonzero_exit(benchmark: Any) -> None:
    """Issue 10 item 2: a timed command that exits non-zero fails the measurement instead of being fast."""
    with pytest.raises(bench.GateRunFailed, match="exited 1"):
        bench.command_runner([sys.executable, "-c", "import sys; sys.exit(1)"])()
    with pytest.raises(bench.GateRunFailed, match="printed no"):
        bench.command_runner([sys.executable, "-c", "print('hi')"], stdout_pattern=r"\Abye")()
    r = bench.command_runner([sys.executable, "-c", "print('hi')"], stdout_pattern=r"\Ahi")()
    assert r.stdout == "hi\n"
    with pytest.raises(bench.GateRunFailed):
        bench.time_sides(
            benchmark,
            {"bad": bench.command_runner([sys.executable, "-c", "raise SystemExit(3)"])},
            primary="bad",
            rounds=2,
        )


@pytest.mark.parametrize(
    ("version", "check", "failing"),
    [
        ((1, ""), (1, ""), "nkudo-edge version"),  # crashes at once
        ((0, "nkudo-edge 0.1.0"), (1, "Traceback (most recent call last):"), "nkudo-edge check"),
        ((0, "nkudo-edge 0.1.0"), (2, SUMMARY_FAILED), "nkudo-edge check"),  # usage error: not a run
        ((0, "usage: nkudo-edge"), (0, "All checks passed! System is ready."), "nkudo-edge version"),
    ],
)
def test_startup_gate_fails_when_a_command_fails(
    tmp_path: Path, version: tuple[int, str], check: tuple[int, str], failing: str, benchmark: Any
) -> None:
    """Issue 10 item 2: the start-up gate's timed commands must have succeeded on every run.

    Issue 11: whether the failing command is the side the fixture times or a side
    timed between the fixture's rounds, the gate fails.
    """
    cmds = startup_commands(_fake_bin(tmp_path, version, check))
    with pytest.raises(bench.GateRunFailed):
        cmds[failing]()
    with pytest.raises(bench.GateRunFailed):
        bench.time_sides(benchmark, cmds, primary="nkudo-edge version", rounds=1, warmup_rounds=0)


def test_startup_gate_accepts_a_complete_check_with_failed_host_checks(tmp_path: Path, benchmark: Any) -> None:
    """`check` exits 1 when a host check fails; with its summary printed that is a complete, timeable run."""
    cmds = startup_commands(_fake_bin(tmp_path, (0, "nkudo-edge 0.1.0"), (1, SUMMARY_FAILED)))
    res = bench.time_sides(benchmark, cmds, primary="nkudo-edge version", rounds=2, warmup_rounds=0)
    assert set(res) == {"python -c pass", "nkudo-edge version", "nkudo-edge check"}
    assert all(t.rounds == 2 and t.median > 0 for t in res.values())
    assert res["nkudo-edge version"] == bench.fixture_timing(benchmark)


_GATES = '''
import sys
from benchmarks.conftest import command_runner, record, time_sides

def test_good_gate(benchmark):
    res = time_sides(benchmark, {
        "fast": command_runner([sys.executable, "-c", "pass"]),
        "slow": command_runner([sys.executable, "-c", "import time; time.sleep(0.05)"]),
    }, primary="fast", rounds=3)
    ratio = res["slow"].median / res["fast"].median
    record(benchmark, "unit_test_gate", fast_ms=res["fast"].median_ms, slow_ms=res["slow"].median_ms, ratio=ratio)
    assert ratio > 1

def test_gate_with_a_failing_side(benchmark):
    time_sides(benchmark, {
        "fast": command_runner([sys.executable, "-c", "pass"]),
        "broken": command_runner([sys.executable, "-c", "raise SystemExit(2)"]),
    }, primary="fast", rounds=3)
'''


def _run_gates(tmp_path: Path, cwd: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """A real pytest-benchmark run of two small gates, as ``make bench`` runs them; its JSON record."""
    (tmp_path / "test_tiny_gates.py").write_text(textwrap.dedent(_GATES))
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_tiny_gates.py"), f"--benchmark-json={out}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    return r, json.loads(out.read_text())


def test_run_record_carries_the_commit_and_gate_figures(tmp_path: Path) -> None:
    """Issue 11: the record of a run (pytest-benchmark JSON) names the commit and holds each gate's ratio and inputs.

    And a gate whose measured command fails fails the run and leaves no timing in the record.
    """
    r, record = _run_gates(tmp_path, ROOT)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
    assert "GateRunFailed" in r.stdout and "exited 2" in r.stdout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # an unpacked sdist, not a checkout: recorded as unversioned, not guessed
        assert record["commit_info"]["id"] == "unversioned"
    else:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        assert record["commit_info"]["id"] == head.stdout.strip()
        assert record["commit_info"]["dirty"] is bool(status.stdout.strip())
    [gate] = record["benchmarks"]  # the failed gate's timing is not in the record
    assert gate["name"] == "test_good_gate"
    info = gate["extra_info"]
    assert info["gate"] == "unit_test_gate"
    assert info["ratio"] == pytest.approx(info["slow_ms"] / info["fast_ms"], rel=0.01)
    assert info["fast_ms"] == pytest.approx(gate["stats"]["median"] * 1e3, abs=1e-3)
    assert gate["stats"]["rounds"] == 3


def test_run_record_outside_a_checkout(tmp_path: Path) -> None:
    """Outside git the record says the run is unversioned rather than failing or inventing a commit."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, record = _run_gates(tmp_path, elsewhere)
    assert record["commit_info"]["id"] == "unversioned"


def test_make_bench_writes_the_record_named_for_the_commit() -> None:
    """Issue 11: `make bench` writes pytest-benchmark's JSON, named for the commit it measured."""
    r = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 else "unversioned"
    [line] = [ln for ln in r.stdout.splitlines() if "pytest" in ln and " benchmarks" in ln]
    assert f"--benchmark-json=.benchmarks/run-{commit}.json" in line.split()


def _bench_tests() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for f in sorted((ROOT / "benchmarks").glob("test_*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.append((f"{f.name}::{node.name}", node))
    return out


def test_every_benchmark_is_timed_by_the_fixture() -> None:
    """Issue 11: every gate body is timed with the ``benchmark`` fixture, and none keeps a hand-rolled log.

    A test that is not a timing says so in its docstring ("Not a timing").
    """
    tests = _bench_tests()
    assert len(tests) >= 19
    untimed = [
        name
        for name, fn in tests
        if "benchmark" not in [a.arg for a in fn.args.args]
        and "Not a timing" not in (ast.get_docstring(fn) or "")
    ]
    assert untimed == []
    for name, fn in tests:
        assert ast.get_docstring(fn), f"{name} has no docstring saying what it gates and how it is timed"
    sources = "".join(f.read_text() for f in (ROOT / "benchmarks").glob("*.py"))
    assert "gates.jsonl" not in sources
