"""Issue 10 item 2: benchmark gates measure only successful runs and record the commit they measured.

The start-up gate used to time ``nkudo-edge version``/``check`` without looking
at their exit status, so a command that crashed at once "passed" as fast. These
tests run the gate's own measuring helpers on real (tiny) commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_command_runner_fails_on_nonzero_exit() -> None:
    """Issue 10 item 2: a timed command that exits non-zero fails the measurement instead of being fast."""
    with pytest.raises(bench.GateRunFailed, match="exited 1"):
        bench.command_runner([sys.executable, "-c", "import sys; sys.exit(1)"])()
    with pytest.raises(bench.GateRunFailed, match="printed no"):
        bench.command_runner([sys.executable, "-c", "print('hi')"], stdout_pattern=r"\Abye")()
    r = bench.command_runner([sys.executable, "-c", "print('hi')"], stdout_pattern=r"\Ahi")()
    assert r.stdout == "hi\n"
    with pytest.raises(bench.GateRunFailed):
        bench.interleaved(
            {"bad": bench.command_runner([sys.executable, "-c", "raise SystemExit(3)"])}, rounds=2
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
    tmp_path: Path, version: tuple[int, str], check: tuple[int, str], failing: str
) -> None:
    """Issue 10 item 2: the start-up gate's timed commands must have succeeded on every run."""
    cmds = startup_commands(_fake_bin(tmp_path, version, check))
    with pytest.raises(bench.GateRunFailed):
        cmds[failing]()
    with pytest.raises(bench.GateRunFailed):
        bench.interleaved(cmds, rounds=1, warmup=0)


def test_startup_gate_accepts_a_complete_check_with_failed_host_checks(tmp_path: Path) -> None:
    """`check` exits 1 when a host check fails; with its summary printed that is a complete, timeable run."""
    cmds = startup_commands(_fake_bin(tmp_path, (0, "nkudo-edge 0.1.0"), (1, SUMMARY_FAILED)))
    res = bench.interleaved(cmds, rounds=2, warmup=0)
    assert set(res) == {"python -c pass", "nkudo-edge version", "nkudo-edge check"}


def test_gate_records_carry_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 2: every line of gates.jsonl names the commit it measured and whether the tree was dirty."""
    monkeypatch.setattr(bench, "GATES", tmp_path / "gates.jsonl")
    bench.record_gate("unit_test_gate", value_ms=1.5)
    bench.record_gate("unit_test_gate_2", ratio=2.0)
    lines = [json.loads(ln) for ln in (tmp_path / "gates.jsonl").read_text().splitlines()]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # an unpacked sdist, not a checkout: recorded as unknown, not guessed
        expected: dict[str, object] = {"commit": None, "dirty": None}
    else:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        expected = {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    assert [ln["gate"] for ln in lines] == ["unit_test_gate", "unit_test_gate_2"]
    for ln in lines:
        assert {k: ln[k] for k in ("commit", "dirty")} == expected
    assert lines[0]["value_ms"] == 1.5


def test_commit_info_outside_a_checkout(tmp_path: Path) -> None:
    """Outside git the record says ``commit: null`` rather than failing or inventing one."""
    assert bench.commit_info(tmp_path) == {"commit": None, "dirty": None}
