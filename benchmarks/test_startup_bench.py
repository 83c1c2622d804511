"""Start-up gates: `nkudo-edge version` ≤ 2.5× and `check` ≤ 5× a bare `python -c pass`.

Measured from the agent-only wheel installed offline in a fresh venv (what an operator runs: no
control-plane or simulator packages on its path, issue 14), all
three commands interleaved in the same run so machine noise hits them equally:
the fixture times `nkudo-edge version`, the other two are timed between its
rounds with the fixture's clock (``time_sides``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.wheel_env import fresh_venv_with_wheel

from benchmarks.conftest import Benchmark, command_runner, record, time_sides

ROUNDS = 25


@pytest.fixture(scope="module")
def wheel_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_venv_with_wheel(tmp_path_factory.mktemp("wheel"))


# `check` exits 1 when a host check fails (a complete run on a host without br0 or
# cloud-hypervisor): its summary line, not its exit code, proves it ran to the end.
CHECK_SUMMARY = r"All checks passed|\d+ checks? failed, \d+ warnings?\."


def startup_commands(bin_dir: Path) -> dict[str, Callable[[], object]]:
    """The three timed commands, each failing the gate on any run that did not succeed."""
    py, edge = str(bin_dir / "python"), str(bin_dir / "nkudo-edge")
    return {
        "python -c pass": command_runner([py, "-c", "pass"]),
        "nkudo-edge version": command_runner([edge, "version"], stdout_pattern=r"\Ankudo-edge \S+"),
        "nkudo-edge check": command_runner([edge, "check"], ok_codes=(0, 1), stdout_pattern=CHECK_SUMMARY),
    }


def test_cli_startup_ratios(wheel_bin: Path, benchmark: Benchmark) -> None:
    """Gates: `nkudo-edge version` <= 2.5x and `check` <= 5x `python -c pass` (medians of 25 interleaved rounds)."""
    res = time_sides(benchmark, startup_commands(wheel_bin), primary="nkudo-edge version", rounds=ROUNDS)
    base = res["python -c pass"].median
    v_ratio = res["nkudo-edge version"].median / base
    c_ratio = res["nkudo-edge check"].median / base
    record(
        benchmark,
        "cli_startup",
        python_pass_ms=round(base * 1000, 1),
        version_ms=round(res["nkudo-edge version"].median * 1000, 1),
        check_ms=round(res["nkudo-edge check"].median * 1000, 1),
        version_ratio=round(v_ratio, 2),
        check_ratio=round(c_ratio, 2),
        rounds=ROUNDS,
        limit_version_ratio=2.5,
        limit_check_ratio=5.0,
    )
    assert v_ratio <= 2.5, f"nkudo-edge version is {v_ratio:.2f}x python -c pass (budget 2.5x)"
    assert c_ratio <= 5.0, f"nkudo-edge check is {c_ratio:.2f}x python -c pass (budget 5x)"


def test_fast_commands_do_not_import_heavy_modules(wheel_bin: Path) -> None:
    """The budget depends on these staying out of `version` and `check`.

    Not a timing (which modules a command imports), so not timed by the fixture.
    """
    code = (
        "import sys; from nkudo.cli.entry import main; import io, contextlib;"
        "buf = io.StringIO();\n"
        "with contextlib.redirect_stdout(buf): main(sys.argv[1:])\n"
        "heavy = [m for m in ('click', 'pyroute2', 'prometheus_client', 'cryptography', 'http.client', 'aiohttp', 'psutil', 'logging') if m in sys.modules];"
        "print('HEAVY=' + ','.join(heavy))"
    )
    for cmd in (["version"], ["check"]):
        out = subprocess.run(
            [str(wheel_bin / "python"), "-c", code, *cmd], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, f"{cmd} probe failed: {out.stderr[-2000:]}"
        assert out.stdout.strip().splitlines()[-1] == "HEAVY=", (
            f"{cmd} imported {out.stdout.strip()} {out.stderr}"
        )
    assert sys.version_info >= (3, 11)
