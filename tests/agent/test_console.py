"""Issue 15 (console logs): sanitising, rotation under a live writer, tails, the CLI, timeouts with the console.

Real files on the real file system, real writer processes (one without ``O_APPEND``, as Cloud
Hypervisor opens its serial file, one with it), the real ``nkudo-edge`` and nkudo-ch-sim.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from nkudo.agent import console
from nkudo.wire import messages as wm
from tests.agent.conftest import EDGE, Host
from tests.agent.test_lifecycle import _act, _create

MiB = 1024 * 1024


def test_sanitize_removes_every_control_sequence_but_newline_and_tab() -> None:
    """Issue 15: console text is untrusted; escape sequences and control characters never reach a terminal."""
    raw = (
        b"plain\ttab\r\n"
        b"\x1b[2J\x1b[H\x1b[31mred\x1b[0m\n"  # CSI: clear screen, home, colour
        b"\x1b]0;pwned title\x07after-osc\n"  # OSC window title (BEL)
        b"\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\\n"  # OSC 8 hyperlink (ST)
        b"\x1bP+q544e\x1b\\dcs\n"  # DCS
        b"\x1b(Bcharset \x1bc reset\n"  # nF and Fs escapes
        b"bell\x07 bs\x08 nul\x00 del\x7f\n"
        b"\xc2\x9b31mc1-csi \xc2\x85nel\n"  # C1 controls in UTF-8
        b"\xe2\x80\xaeevil-rtl\xe2\x80\xac \xe2\x81\xa6iso\xe2\x81\xa9\n"  # bidi overrides and isolates
        b"bad utf8 \xff\xfe end \x1b["  # invalid UTF-8, unfinished escape at the end
    )
    got = console.sanitize(raw)
    assert got.split("\n") == [
        "plain\ttab",
        "red",
        "after-osc",
        "link",
        "dcs",
        "charset  reset",
        "bell bs nul del",
        "c1-csi nel",
        "evil-rtl iso",
        "bad utf8 \ufffd\ufffd end ",
    ]


def test_sanitized_text_is_always_accepted_by_the_wire() -> None:
    """Issue 15: whatever bytes a guest prints, the sanitised text passes the wire's ConsoleText rule
    (the control plane refuses a tail carrying any control character; the agent must never send one)."""
    rnd = random.Random(15)
    alphabet = [bytes([b]) for b in range(256)] + ["\u202e".encode(), "\u2066".encode(), b"\x1b[", b"\x1b]", "\x9b".encode()]
    for _ in range(300):
        raw = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 200)))
        text = console.sanitize(raw)
        msgspec.convert({"vm_id": "vm-1", "lines": 1, "text": text}, wm.ConsoleTail)
        assert not any(ord(c) < 32 and c not in "\n\t" for c in text)


def _writer(path: Path, append: bool) -> subprocess.Popen[bytes]:
    """A process that opens ``path`` once (like a VMM) and writes numbered lines until killed."""
    mode = "ab" if append else "wb"  # "wb": O_WRONLY|O_CREAT|O_TRUNC, Cloud Hypervisor's File::create
    code = (
        f"import sys,time\nf=open({str(path)!r},{mode!r},buffering=0)\ni=0\n"
        "while True:\n    f.write(b'line %09d ' % i + b'x' * 90 + b'\\n'); i += 1\n"
        "    if i % 500 == 0: time.sleep(0.001)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def _numbers(text: str) -> list[int]:
    return [int(x.split()[1]) for x in text.splitlines() if x.startswith("line ")]


@pytest.mark.parametrize("append", [False, True], ids=["no-O_APPEND", "O_APPEND"])
def test_rotation_bounds_disk_use_under_a_live_writer_and_loses_nothing_recent(tmp_path: Path, append: bool) -> None:
    """Issue 15: the console is rotated by size while the VMM keeps writing it: disk use stays near the
    cap, the writer is never disturbed (it keeps its offset, nothing is copied), and the newest lines are
    there, contiguous."""
    vm = tmp_path / "vm-1"
    vm.mkdir()
    path = vm / "console.log"
    w = _writer(path, append)
    try:
        keep = 1 * MiB
        deadline = time.monotonic() + 60
        while (not path.exists() or path.stat().st_size < 6 * MiB) and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(5):
            assert console.rotate_all(str(tmp_path), keep) == 1
            time.sleep(0.1)
        assert console.rotate(str(path), keep)
        st = path.stat()
        assert st.st_size >= 6 * MiB  # the apparent size is the writer's: untouched
        assert st.st_blocks * 512 <= keep + 2 * MiB, "rotation did not free the old output"
        size_before = st.st_size
        time.sleep(0.3)
        assert path.stat().st_size > size_before, "the writer stopped after rotation"
    finally:
        w.kill()
        w.wait()
    console.rotate(str(path), keep)
    assert path.stat().st_blocks * 512 <= keep + 2 * MiB
    nums = _numbers(console.tail_text(str(vm), 5000))
    assert len(nums) >= 5000 and nums == list(range(nums[0], nums[0] + len(nums)))  # contiguous
    with open(path, "rb") as f:  # the last line in the file is the last line of the tail
        f.seek(-4096, os.SEEK_END)
        assert _numbers(f.read().decode(errors="replace").split("\n", 1)[1])[-1] == nums[-1]


def test_previous_run_is_kept_and_tail_reads_across_both(tmp_path: Path) -> None:
    """Issue 15: a VMM relaunched on the VM truncates console.log; the last run's console survives as
    console.log.1 and a tail spans both files."""
    vm = tmp_path / "vm-1"
    vm.mkdir()
    (vm / "console.log").write_bytes(b"old 1\nold 2\nKernel panic - not syncing\n")
    console.prepare_for_launch(str(vm / "console.log"))
    assert not (vm / "console.log").exists()
    (vm / "console.log").write_bytes(b"new 1\nnew 2")  # the new VMM; no newline yet
    assert console.tail_lines(str(vm), 3) == ["Kernel panic - not syncing", "new 1", "new 2"]
    assert console.tail_lines(str(vm), 1) == ["new 2"]


def _readline(p: subprocess.Popen[bytes], timeout: float = 20.0) -> bytes:
    """One line of ``p``'s stdout, failing (not hanging) when none comes within ``timeout``."""
    assert p.stdout is not None
    fd, line, end = p.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], max(end - time.monotonic(), 0))[0]:
            pytest.fail(f"no complete line within {timeout}s (got {line!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line


def test_cli_console_prints_the_sanitised_tail_and_follows(tmp_path: Path) -> None:
    """Issue 15: `nkudo-edge console VM_ID --lines N [--follow]` prints the last N lines, control sequences
    removed, then (with --follow) what the VMM writes next, until SIGTERM."""
    runtime = tmp_path / "vms"
    vm = runtime / "vm-1"
    vm.mkdir(parents=True)
    log = vm / "console.log"
    log.write_bytes(b"one\ntwo\n\x1b[2Jthree\x1b]0;t\x07\n")
    r = subprocess.run([EDGE, "console", "vm-1", "--runtime-dir", str(runtime), "--lines", "2"],
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"two\nthree\n"
    r = subprocess.run([EDGE, "console", "vm-9", "--runtime-dir", str(runtime)], capture_output=True, timeout=60)
    assert r.returncode == 1 and b"VM_NOT_FOUND" in r.stderr and b"vm-9" in r.stderr
    p = subprocess.Popen([EDGE, "console", "vm-1", "--runtime-dir", str(runtime), "--lines", "1", "--follow"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert _readline(p) == b"three\n"
        with open(log, "ab") as f:
            f.write(b"four \x1b[1mbold\x1b[0m\n")
        assert _readline(p) == b"four bold\n"
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


def test_start_timeout_error_includes_the_console_tail(host: Host) -> None:
    """Issue 15: when a start times out, the action's error carries the console's last lines (the guest's
    panic), not only "timed out". nkudo-ch-sim runs no guest, so the test writes what a guest would have
    printed; the boot itself really hangs (--sim-boot-delay) and the CH client really times out."""
    h = host
    h.set_sim_flags("--sim-boot-delay", "30")  # only vm.boot hangs; the create below does not boot
    rc, doc, err = h.apply([_create(h, start=False)])
    assert rc == 0, (doc, err)
    (h.vms / "vm-1" / "console.log").write_bytes(
        b"[    0.000000] Linux version 6.1\n[    1.234567] \x1b[31mKernel panic - not syncing: VFS: Unable to "
        b"mount root fs\x1b[0m\n[    1.234600] ---[ end Kernel panic ]---\n"
    )
    start = _act("start-1", "MicroVMStart")
    start["timeout_seconds"] = 2
    rc, doc, err = h.apply([start])
    assert rc == 1, (doc, err)
    (out,) = doc["outcomes"]
    assert out["status"] == "TIMED_OUT", out
    msg = out["error_message"]
    assert "last console lines:" in msg, msg
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in msg
    assert "end Kernel panic" in msg and "\x1b" not in msg


def test_answer_ships_sanitised_tails_and_says_when_there_is_no_console(tmp_path: Path) -> None:
    """Issue 15: the agent's answer to the control plane's console requests: the last lines, sanitised,
    within the wire's bound; ``found=False`` for a VM without a console on this host."""
    vm = tmp_path / "vm-1"
    vm.mkdir()
    (vm / "console.log").write_bytes(b"a\nb\n\x1b[1mc\x1b[0m\n" + b"z" * (100 * 1024) + b"\nlast\n")
    tails = console.answer(str(tmp_path), [wm.ConsoleRequest(vm_id="vm-1", lines=2),
                                           wm.ConsoleRequest(vm_id="vm-2", lines=5),
                                           wm.ConsoleRequest(vm_id="vm-1", lines=3)])  # fmt: skip
    assert tails[0] == wm.ConsoleTail(vm_id="vm-1", lines=2, text="last\n")  # the 100 KiB line does not fit
    assert tails[1] == wm.ConsoleTail(vm_id="vm-2", lines=5, found=False)
    assert tails[2].text == "last\n"
    body = json.loads(msgspec.json.encode(wm.HeartbeatRequest(consoles=tails)))
    msgspec.convert(body, wm.HeartbeatRequest)
