"""CommandExecute: deny by default, no shell, scrubbed env, timeouts kill the group, capped output."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nkudo.agent.hostcmd import OUTPUT_CAP, CommandFailed, normalise_allowlist, run_command
from nkudo.errors import NkudoError, ValidationError

SH = normalise_allowlist(["/bin/sh"])


def test_not_allowed_and_relative_commands_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    with pytest.raises(NkudoError) as ei:
        run_command("/bin/touch", [str(marker)], cwd="/", timeout=5, allow=SH)
    assert ei.value.code == "COMMAND_NOT_ALLOWED" and ei.value.field == "params.command"
    with pytest.raises(ValidationError):
        run_command("sh", ["-c", "true"], cwd="/", timeout=5, allow=SH)
    assert not marker.exists()


def test_symlink_to_allowed_binary_resolves(tmp_path: Path) -> None:
    link = tmp_path / "mysh"
    link.symlink_to("/bin/sh")
    assert run_command(str(link), ["-c", "echo ok"], cwd="/", timeout=5, allow=SH)["stdout"] == "ok\n"


def test_no_shell_interpretation_and_scrubbed_env(tmp_path: Path) -> None:
    os.environ["NKUDO_SECRET_TEST"] = "leak"
    try:
        echo = normalise_allowlist(["/bin/echo", "/usr/bin/env"])
        out = run_command("/bin/echo", ["$(id)", ";", "rm", "-rf", "/"], cwd="/", timeout=5, allow=echo)
        assert out["stdout"] == "$(id) ; rm -rf /\n"
        env = run_command("/usr/bin/env", [], cwd=str(tmp_path), timeout=5, allow=echo)["stdout"]
        assert "NKUDO_SECRET_TEST" not in env and "PATH=" in env
    finally:
        del os.environ["NKUDO_SECRET_TEST"]


def test_bad_working_directory(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as ei:
        run_command("/bin/sh", ["-c", "true"], cwd=str(tmp_path / "nope"), timeout=5, allow=SH)
    assert ei.value.field == "params.dir"


def test_nonzero_exit_carries_code_and_output() -> None:
    with pytest.raises(CommandFailed) as ei:
        run_command("/bin/sh", ["-c", "echo out; echo err >&2; exit 7"], cwd="/", timeout=5, allow=SH)
    assert ei.value.code == "COMMAND_FAILED"
    assert ei.value.result["exit_code"] == 7
    assert ei.value.result["stdout"] == "out\n" and ei.value.result["stderr"] == "err\n"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    with pytest.raises(CommandFailed) as ei:
        run_command(
            "/bin/sh", ["-c", f"sleep 60 & echo $! > {pidfile}; wait"], cwd="/", timeout=0.5, allow=SH
        )
    assert ei.value.code == "TIMED_OUT"
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"


def test_output_is_capped() -> None:
    out = run_command(
        "/bin/sh", ["-c", f"head -c {OUTPUT_CAP * 3} /dev/zero | tr '\\0' a"], cwd="/", timeout=10, allow=SH
    )
    assert len(out["stdout"]) == OUTPUT_CAP and out["stdout_truncated"] is True


def test_allowlist_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        normalise_allowlist(["bin/sh"])
    f = tmp_path / "data"
    f.write_text("x")
    with pytest.raises(ValidationError):
        normalise_allowlist([str(f)])
