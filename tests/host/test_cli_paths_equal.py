"""Issue 11 (CLI): the start-up fast path and click are one CLI, built from one table of options.

Each invocation runs as a real ``nkudo-edge`` process twice: as operators run it (the fast
path serves version, check and run without importing click) and with
``NKUDO_CLI_FORCE_CLICK=1`` (click parses). Help, usage errors and failures must be the
same, byte for byte, with the same exit code.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nkudo.cli import app, options
from nkudo.cli.options import COMMANDS, FAST_COMMANDS, GLOBAL_OPTS, GLOBAL_OPTS_AFTER, Opt, fast_parse

EDGE = str(Path(sys.executable).parent / "nkudo-edge")
FORCE = {"NKUDO_CLI_FORCE_CLICK": "1"}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NKUDO_") and k != "NO_COLOR"}
    env.update(extra or {})
    return env


def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE, *args], capture_output=True, text=True, env=_env(env), timeout=60, check=False
    )


def both(*args: str, env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """(exit code, stdout, stderr) through the fast path and forced through click."""
    fast, slow = edge(*args, env=env), edge(*args, env={**(env or {}), **FORCE})
    return (fast.returncode, fast.stdout, fast.stderr), (slow.returncode, slow.stdout, slow.stderr)


def test_force_click_really_skips_the_fast_path() -> None:
    """Without this the comparisons below would compare the fast path with itself."""
    code = (
        "import sys, io, contextlib\nfrom nkudo.cli.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): rc = main(['version'])\n"
        "print(rc, 'click' in sys.modules)"
    )
    for extra, loaded in (({}, "False"), (FORCE, "True")):
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=_env(extra), check=False
        )
        assert r.stdout.split() == ["0", loaded], (extra, r.stdout, r.stderr)


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in sorted(FAST_COMMANDS))])
def test_help_is_the_same(args: list[str]) -> None:
    fast, slow = both(*args)
    assert fast == slow
    assert fast[0] == 0 and "Usage:" in fast[1] and fast[2] == ""


USAGE_ERRORS: list[tuple[list[str], dict[str, str]]] = [
    (["version", "--no-such-flag"], {}),
    (["version", "--json=yes"], {}),
    (["version", "extra"], {}),
    (["check", "--skip", "bogus"], {}),
    (["check", "--bridge"], {}),
    (["check", "--bridge", "a/b"], {}),
    (["check", "--min-disk-gib", "lots"], {}),
    (["check", "--min-memory-mib", "-1"], {}),
    (["check"], {"NKUDO_NETBIRD_ENABLED": "maybe"}),
    (["check"], {"NKUDO_MIN_DISK_GIB": "lots"}),
    (["run", "--provider", "xen"], {}),
    (["run", "--once", "--pki-dir"], {}),
    (["run", "--log-level", "loud"], {}),
    (["--log-format", "xml", "run"], {}),
    (["run"], {"NKUDO_LOG_FORMAT": "xml"}),
    (["run", "--heartbeat-interval", "-5"], {}),
]


@pytest.mark.parametrize(("args", "env"), USAGE_ERRORS)
def test_usage_errors_are_the_same(args: list[str], env: dict[str, str]) -> None:
    fast, slow = both(*args, env=env)
    assert fast == slow
    rc, out, err = fast
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "error:" in err, fast


def test_failures_are_the_same(tmp_path: Path) -> None:
    # run on a host that is not enrolled
    fresh = tmp_path / "fresh"
    fast, slow = both("run", "--state-dir", str(fresh / "state"), "--pki-dir", str(fresh / "pki"),
                      "--runtime-dir", str(fresh / "vms"), "--metrics-addr", "off")  # fmt: skip
    assert fast == slow
    assert fast[0] == 1 and "NOT_ENROLLED" in fast[2] and len(fast[2].splitlines()) == 1, fast
    # check with a bridge that does not exist (and a state directory of its own)
    args = ["check", "--bridge", "nonexist0", "--state-dir", str(tmp_path / "st"), "--runtime-dir", str(tmp_path),
            "--skip", "disk", "--skip", "memory"]  # fmt: skip
    fast, slow = both(*args)
    assert fast == slow
    assert fast[0] == 1 and "nonexist0" in fast[1] and re.search(r"\d+ checks? failed", fast[1]), fast


def test_closed_stdout_is_the_same_quiet_failure() -> None:
    """Issue 11: with its reader gone, stdout's final flush printed 'Exception ignored ...
    BrokenPipeError' and exited 120; both paths now exit 1 quietly."""
    results = []
    for extra in ({}, FORCE):
        env = _env(extra)
        env.pop("PYTHONUNBUFFERED", None)  # stdout buffered, as when an operator's shell runs it
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([EDGE, "version"], stdout=w, stderr=subprocess.PIPE, text=True, env=env,
                               timeout=60, check=False)  # fmt: skip
        finally:
            os.close(w)
        results.append((p.returncode, p.stderr))
    assert results == [(1, ""), (1, "")], results


def test_interrupt_is_the_same(tmp_path: Path) -> None:
    """Issue 11: Ctrl-C during `check` exited 130 'interrupted' on the fast path but 1 'aborted'
    (after a blank line) through click."""
    mark = tmp_path / "started"
    ch = tmp_path / "cloud-hypervisor"
    ch.write_text(f"#!/bin/sh\ntouch {mark}\nexec sleep 30\n")
    ch.chmod(0o755)
    skip = [a for c in options.CHECK_IDS if c != "cloud_hypervisor" for a in ("--skip", c)]
    results = []
    for extra in ({}, FORCE):
        mark.unlink(missing_ok=True)
        p = subprocess.Popen([EDGE, "check", "--cloud-hypervisor-bin", str(ch), *skip], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env(extra))  # fmt: skip
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.exists(), "the check never ran the stand-in binary"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        results.append((p.returncode, out, err))
    assert results[0] == results[1], results
    assert results[0] == (130, "", "nkudo-edge: interrupted\n"), results


def _help_blocks(text: str) -> dict[str, str]:
    """Each option of a click help page with its (possibly wrapped) description."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s{2}(?:-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def _assert_documented(text: str, specs: tuple[Opt, ...]) -> None:
    blocks = _help_blocks(text)
    for o in specs:
        assert o.flag in blocks, (o.flag, text)
        if o.envvar:
            assert f"env var: {o.envvar}" in blocks[o.flag], (o.flag, blocks[o.flag])
        for choice in o.choices or ():
            assert choice in blocks[o.flag], (o.flag, choice, blocks[o.flag])


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_option_of_the_table_is_in_help_with_its_env_var(cmd: str) -> None:
    r = edge(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert COMMANDS[cmd].help.split(".")[0] in " ".join(r.stdout.split())
    _assert_documented(r.stdout, COMMANDS[cmd].opts + GLOBAL_OPTS_AFTER)


def test_global_options_are_in_top_level_help() -> None:
    r = edge("--help")
    _assert_documented(r.stdout, GLOBAL_OPTS)
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", r.stdout, re.M), name


def _sample(o: Opt) -> list[str]:
    """A valid value of ``o`` that is not its default (as argv items)."""
    if o.is_flag:
        return [o.flag]
    value = {"int": "5", "float": "2.5", "path": "/tmp/x", "ifname": "brx", "str": "abc"}[o.kind]
    if o.choices:
        value = o.choices[-1]
    return [o.flag, value, o.flag, value] if o.multiple else [o.flag, value]


def _env_sample(o: Opt) -> str:
    if o.is_flag:
        return "yes"
    argv = _sample(o)
    return f"{argv[1]} /other" if o.multiple and o.kind == "path" else argv[1]


def _cases() -> list[tuple[list[str], dict[str, str]]]:
    cases: list[tuple[list[str], dict[str, str]]] = []
    for cmd in sorted(FAST_COMMANDS):
        cases.append(([cmd], {}))
        for o in COMMANDS[cmd].opts + GLOBAL_OPTS:
            cases.append(([cmd, *_sample(o)], {}))
            if o.envvar:
                cases.append(([cmd], {o.envvar: _env_sample(o)}))
                cases.append(([cmd], {o.envvar: ""}))
        cases.append((["--state-dir", "/a", cmd, "--state-dir", "/b", "--log-level", "warn"], {}))
    return cases


def test_fast_parse_gives_what_click_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: NKUDO_IMAGE_ROOT='/a /b' became image roots '/', ' ', 'a', ... on the fast path
    (a string where click gives a tuple split at whitespace), so `run` and `apply` disagreed."""
    for key in [k for k in os.environ if k.startswith("NKUDO_")]:
        monkeypatch.delenv(key)
    served = 0
    for argv, env in _cases():
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            fast = fast_parse(argv)
            slow = app.parse(argv)
        if fast is not None:
            served += 1
            assert fast == slow, (argv, env)
    assert served == len(_cases())  # every case above is one the fast path serves itself
