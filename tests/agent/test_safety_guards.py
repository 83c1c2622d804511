"""Safety checks of the edge agent that a one-line bug could defeat without any other test failing.

Each test names, in its docstring, the one-line mutation of the code it catches (found by a mutation
sweep: the mutant passed every existing test). Path confinement, plan bounds, host-command guards,
process identity and the executor's stop-after-failure rule. The real-host half is in ``test_safety_guards_host.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent import console
from nkudo.agent import paths as P
from nkudo.agent.hostcmd import normalise_allowlist, run_command
from nkudo.agent.plan import MAX_ACTIONS, MAX_TIMEOUT, parse_plan
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.agent.seed import write_seed_iso
from nkudo.errors import NkudoError, ValidationError
from nkudo.net.errors import NetInvalidArgument
from nkudo.net.hostnet import owner_alias, tap_name
from nkudo.net.link import OWNER_PREFIX
from nkudo.net.rtnl import IFALIASZ
from nkudo.proc.errors import AdoptionRefused
from nkudo.proc.identity import ProcessIdentity, check_identity, identity_after_exec, read_identity
from nkudo.wire import messages as wm
from tests.agent.test_plan_nesting import CREATE

SH = normalise_allowlist(["/bin/sh"])


def _cmd(action_id: str = "c1", **params: Any) -> dict[str, Any]:
    return {"action_id": action_id, "type": "CommandExecute", "params": {"command": "/bin/true", **params}}


def _refused(doc: Any) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        parse_plan(doc)
    return ei.value


def _command_agent(tmp_path: Path) -> Agent:
    """An agent allowed to run ``/bin/sh`` (no VM is made, so no VMM binary or bridge is needed)."""
    cfg = AgentConfig(
        state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "vms"),
        snapshot_dir=str(tmp_path / "snaps"), image_roots=(str(tmp_path),), exec_allow=("/bin/sh",),
    )  # fmt: skip
    return Agent(cfg)


def _gone_or_zombie(pid: int, within: float = 3.0) -> bool:
    """Whether ``pid`` has ended (looked at once, then again until ``within`` seconds have passed)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# --------------------------------------------------------------------------- path confinement


def test_safe_join_refuses_a_symlink_to_another_vms_directory(tmp_path: Path) -> None:
    """Catches dropping ``real != path`` in ``safe_join``: a symlink that stays inside the root (to another
    VM's directory) passes the containment check alone, and one VM's actions would act on another's files."""
    root = tmp_path / "vms"
    (root / "vm-2").mkdir(parents=True)
    (root / "vm-1").symlink_to(root / "vm-2")
    with pytest.raises(NkudoError) as ei:
        P.safe_join(str(root), "vm-1")
    assert ei.value.code == "PATH_ESCAPE"
    assert P.safe_join(str(root), "vm-2") == os.path.join(os.path.realpath(root), "vm-2")


def test_within_roots_refuses_a_relative_path_even_from_inside_a_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches dropping the ``isabs`` check of ``within_roots``: ``realpath`` would resolve a relative path
    against the agent's working directory, so what a plan names would depend on where the agent runs."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_text("k")
    monkeypatch.chdir(images)
    with pytest.raises(ValidationError) as ei:
        P.within_roots("vmlinux", (str(images),), "params.kernel_path")
    assert ei.value.field == "params.kernel_path"


def test_within_roots_is_not_a_string_prefix_match(tmp_path: Path) -> None:
    """Catches ``commonpath(...) == rr`` -> ``real.startswith(rr)``: ``/x/images-evil/k`` starts with the
    allowed root ``/x/images`` but is outside it."""
    images = tmp_path / "images"
    images.mkdir()
    evil = tmp_path / "images-evil"
    evil.mkdir()
    (evil / "vmlinux").write_text("k")
    with pytest.raises(NkudoError) as ei:
        P.within_roots(str(evil / "vmlinux"), (str(images),), "params.kernel_path")
    assert ei.value.code == "PATH_NOT_ALLOWED"


def test_within_roots_refuses_a_directory(tmp_path: Path) -> None:
    """Catches ``isfile`` -> ``exists``: a directory inside the image root is not a kernel or a disk image."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for p in (images / "sub", images):
        with pytest.raises(NkudoError) as ei:
            P.within_roots(str(p), (str(images),), "params.image_path")
        assert ei.value.code == "FILE_NOT_FOUND"


def test_socket_path_limit_is_exactly_sun_path() -> None:
    """Catches ``>`` -> ``>=`` and ``SUN_PATH_MAX`` 107 -> 108: a 108-byte path has no room for the NUL of
    ``sockaddr_un.sun_path`` (the VMM would fail to bind), while 107 bytes fit."""
    ok = "/" + "x" * 106
    assert P.check_socket_path(ok) == ok
    with pytest.raises(NkudoError) as ei:
        P.check_socket_path(ok + "x")
    assert ei.value.code == "PATH_TOO_LONG"


# --------------------------------------------------------------------------- plan bounds


def test_timeout_seconds_bounds() -> None:
    """Catches ``0 < t`` -> ``0 <= t``, ``t <= MAX_TIMEOUT`` -> ``<`` and dropping the ``bool`` check:
    a zero time limit, a JSON ``true`` (an int in Python) and anything above a day are refused; a day is not."""
    for bad in (0, 0.0, True, MAX_TIMEOUT + 1, MAX_TIMEOUT + 0.5):
        err = _refused({"actions": [{**_cmd(), "timeout_seconds": bad}]})
        assert err.field == "actions[0].timeout_seconds", bad
    _, actions = parse_plan({"actions": [{**_cmd(), "timeout_seconds": MAX_TIMEOUT}]})
    assert actions[0].timeout == float(MAX_TIMEOUT)


def test_malformed_execution_and_plan_ids_are_refused() -> None:
    """Catches dropping the pattern checks of ``execution_id`` and ``plan_id``: both key durable records
    and logs, so a newline, a path or an empty string in them must not pass."""
    for bad in ("", "a\n", "../x", "a b", "x" * 129, 7):
        err = _refused({"actions": [{**_cmd(), "execution_id": bad}]})
        assert err.field == "actions[0].execution_id", bad
        err = _refused({"plan_id": bad, "actions": [_cmd()]})
        assert err.field == "plan_id", bad
        err = _refused({"idempotency_key": bad, "actions": [_cmd()]})
        assert err.field == "plan_id", bad
    plan_id, actions = parse_plan({"plan_id": "p:1", "actions": [{**_cmd(), "execution_id": "e-1"}]})
    assert plan_id == "p:1" and actions[0].execution_id == "e-1"


def test_action_count_limit() -> None:
    """Catches ``len > MAX_ACTIONS`` -> ``len > MAX_ACTIONS + 1``: one action more than the limit is refused."""
    many = [_cmd(f"c{i}") for i in range(MAX_ACTIONS + 1)]
    assert _refused({"actions": many}).field == "actions"
    assert len(parse_plan({"actions": many[:MAX_ACTIONS]})[1]) == MAX_ACTIONS


def test_bridge_name_fits_the_kernels_ifname() -> None:
    """Catches ``{0,14}`` -> ``{0,15}`` in ``IFNAME_PATTERN``: Linux interface names have at most 15 bytes."""
    doc = copy.deepcopy(CREATE)
    doc["params"]["nics"] = [{"bridge": "b" * 16}]
    assert _refused([doc]).field == "actions[0].params.nics[0].bridge"
    doc["params"]["nics"] = [{"bridge": "b" * 15}]
    parse_plan([doc])


def test_repeated_mac_is_refused_whatever_its_case() -> None:
    """Catches dropping ``.lower()`` in the duplicate-MAC rule: ``..:0a`` and ``..:0A`` are one address."""
    doc = copy.deepcopy(CREATE)
    doc["params"]["nics"] = [
        {"bridge": "br0", "mac": "02:00:00:00:00:0a"},
        {"bridge": "br0", "mac": "02:00:00:00:00:0A"},
    ]
    assert _refused([doc]).field == "actions[0].params.nics[1].mac"


def test_command_argument_count_limit() -> None:
    """Catches ``max_length=256`` -> ``257`` on ``CommandExecute.args``."""
    assert _refused([_cmd(args=["x"] * 257)]).field == "actions[0].params.args"
    parse_plan([_cmd(args=["x"] * 256)])


# --------------------------------------------------------------------------- host commands


def test_allowlist_entries_must_be_absolute_even_if_they_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches dropping the ``isabs`` check of ``normalise_allowlist``: from ``/bin`` the relative ``sh``
    resolves to an executable, and the allowlist would depend on the agent's working directory."""
    monkeypatch.chdir("/bin")
    with pytest.raises(ValidationError) as ei:
        normalise_allowlist(["sh"])
    assert ei.value.field == "exec_allow"


def test_nul_in_an_argument_is_a_validation_error_and_nothing_runs(tmp_path: Path) -> None:
    """Catches dropping the NUL check of ``run_command``: the command must be refused as invalid input
    naming the argument (not crash in ``Popen`` with a ``ValueError`` the executor reports as INTERNAL)."""
    marker = tmp_path / "ran"
    with pytest.raises(ValidationError) as ei:
        run_command("/bin/sh", ["-c", f"touch {marker}", "x\0y"], cwd="/", timeout=5, allow=SH)
    assert ei.value.field == "params.args[2]"
    assert not marker.exists()


def test_command_runs_in_the_requested_directory(tmp_path: Path) -> None:
    """Catches ``cwd=cwd`` -> ``cwd="/"`` in ``run_command``: ``params.dir`` is where the command runs."""
    out = run_command("/bin/sh", ["-c", "pwd -P"], cwd=str(tmp_path), timeout=5, allow=SH)
    assert out["stdout"] == os.path.realpath(tmp_path) + "\n"


def test_the_resolved_allowed_executable_is_what_runs(tmp_path: Path) -> None:
    """Catches ``[exe, *args]`` -> ``[command, *args]``: the program executed is the resolved path that was
    checked against the allowlist, not the symlink the plan named (which could be re-pointed in between)."""
    link = tmp_path / "mysh"
    link.symlink_to("/bin/sh")
    out = run_command(str(link), ["-c", 'echo "$0"'], cwd="/", timeout=5, allow=SH)
    assert out["stdout"] == os.path.realpath("/bin/sh") + "\n" == out["command"] + "\n"


def test_timeout_kills_group_members_that_ignore_sigterm(tmp_path: Path) -> None:
    """Catches dropping the final ``killpg(SIGKILL)`` after the leader exits: a child that ignores SIGTERM
    outlives its leader and would keep running after the command was reported as timed out."""
    pidfile = tmp_path / "child.pid"
    script = f"(trap '' TERM; exec sleep 60) & echo $! > {pidfile}; wait"
    child = 0
    try:
        with pytest.raises(NkudoError) as ei:
            run_command("/bin/sh", ["-c", script], cwd="/", timeout=0.5, allow=SH)
        assert ei.value.code == "TIMED_OUT"
        child = int(pidfile.read_text())
        assert _gone_or_zombie(child), f"pid {child} survived the timeout"
    finally:
        if child and not _gone_or_zombie(child, 0):
            os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------- process identity


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process running a private copy of ``sleep`` (so its executable can be deleted)."""
    exe = tmp_path / "vmm"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
    p = subprocess.Popen([str(exe), "60"])
    try:
        yield p, exe
    finally:
        p.kill()
        p.wait(5)


def test_empty_marker_in_a_record_is_refused() -> None:
    """Catches accepting ``marker: ""``: an empty marker is found in every command line, so the marker
    check would pass for any process that reuses the pid with the same executable."""
    good = {"pid": 4242, "start_time": 1, "exe": "/usr/bin/cloud-hypervisor", "boot_id": "b"}
    with pytest.raises(ValidationError) as ei:
        ProcessIdentity.from_dict({**good, "marker": ""})
    assert ei.value.field == "marker"
    assert ProcessIdentity.from_dict({**good, "marker": "/s"}).marker == "/s"


def test_vmm_whose_binary_was_replaced_is_still_recognised(
    sleeper: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Catches dropping the ``exe + " (deleted)"`` alternative: a VMM binary upgraded in place must not make
    the agent refuse (and then treat as crashed) the VMM that still runs the old one."""
    p, exe = sleeper
    ident = read_identity(p.pid)
    exe.unlink()
    assert os.readlink(f"/proc/{p.pid}/exe").endswith(" (deleted)")
    check_identity(ident)
    with pytest.raises(AdoptionRefused) as ei:
        check_identity(dataclasses.replace(ident, exe="/usr/bin/other"))
    assert ei.value.reason == "exe"


def test_identity_after_exec_refuses_another_start_time(
    sleeper: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Catches dropping the start-time comparison of ``identity_after_exec``: the re-read identity is
    otherwise only compared with itself, so a pid reused since the spawn would be taken as the VMM."""
    p, _ = sleeper
    recorded = dataclasses.replace(read_identity(p.pid), start_time=read_identity(p.pid).start_time - 1)
    with pytest.raises(AdoptionRefused) as ei:
        identity_after_exec(recorded)
    assert ei.value.reason == "start_time"


def test_identity_after_exec_refuses_a_process_without_the_marker(
    sleeper: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Catches dropping ``check_identity(now)`` in ``identity_after_exec``: ``read_identity`` does not look at
    the command line, so a launcher that dropped the VM's socket marker would be recorded as its VMM."""
    p, _ = sleeper
    recorded = read_identity(p.pid, marker="/run/nkudo/vm-1/api.sock")
    with pytest.raises(AdoptionRefused) as ei:
        identity_after_exec(recorded)
    assert ei.value.reason == "marker"
    assert identity_after_exec(read_identity(p.pid, marker="60")).pid == p.pid


# --------------------------------------------------------------------------- executor


def test_actions_after_a_failed_one_are_not_run(tmp_path: Path) -> None:
    """Catches ``failed = failed or not o.ok`` -> ``failed = False`` (and dropping the NOT_RUN branch):
    after a failed action the rest of the plan must not touch the host."""
    marker = tmp_path / "ran"
    agent = _command_agent(tmp_path)
    try:
        _, outcomes = agent.run_plan({"actions": [
            {"action_id": "fail", "type": "CommandExecute", "params": {"command": "/bin/sh", "args": ["-c", "exit 3"]}},
            {"action_id": "then", "type": "CommandExecute",
             "params": {"command": "/bin/sh", "args": ["-c", f"touch {marker}"]}},
        ]})  # fmt: skip
        assert [o.status for o in outcomes] == ["FAILED", "NOT_RUN"]
        assert outcomes[1].error_code == "NOT_RUN"
        assert not marker.exists()
        assert agent.store.get_action("then") is None  # not journalled either
    finally:
        agent.close()


def test_console_answer_does_not_follow_a_vm_directory_symlink(tmp_path: Path) -> None:
    """Catches ``P.safe_join(runtime_dir, req.vm_id)`` -> ``os.path.join`` in ``console.answer``: the control
    plane names the VM; a ``<runtime-dir>/<vm id>`` symlink must not ship a file from elsewhere as its console."""
    runtime = tmp_path / "vms"
    runtime.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "console.log").write_text("secret\n")
    (runtime / "vm-1").symlink_to(outside)
    (tail,) = console.answer(str(runtime), [wm.ConsoleRequest(vm_id="vm-1", lines=5)])
    assert tail.found is False and tail.text == ""


def test_tap_owner_marker_fits_the_kernels_ifalias() -> None:
    """Catches ``len(vm_id) <= _MAX_VM_ID`` -> ``<= _MAX_VM_ID + 1``: the kernel truncates an ifalias to
    255 bytes, so a longer marker would no longer name the VM and the agent would lose track of its TAP."""
    longest = "v" * (IFALIASZ - 1 - len(OWNER_PREFIX))
    assert len(owner_alias(longest)) == IFALIASZ - 1
    tap_name(longest)
    with pytest.raises(NetInvalidArgument):
        tap_name(longest + "v")


def test_an_action_without_params_is_a_validation_error() -> None:
    """Catches dropping the ``"params" not in raw`` check of ``parse_action``: the plan must be refused
    naming the field, not crash with a ``KeyError``."""
    err = _refused([{"action_id": "a1", "type": "MicroVMStart"}])
    assert err.field == "actions[0].params"


def test_a_command_is_bounded_by_its_actions_time_limit(tmp_path: Path) -> None:
    """Catches ``min(params.timeout, ctx.remaining())`` -> ``params.timeout`` in ``Agent._command``: the
    plan's ``timeout_seconds`` bounds the command too, not only its own (longer) ``params.timeout``."""
    agent = _command_agent(tmp_path)
    try:
        t0 = time.monotonic()
        _, (out,) = agent.run_plan(
            [{**_cmd(command="/bin/sh", args=["-c", "sleep 5"], timeout=60), "timeout_seconds": 1}]
        )
        assert out.status == "TIMED_OUT", out.to_dict()
        assert time.monotonic() - t0 < 4.5
    finally:
        agent.close()


def test_the_agents_directories_are_private(tmp_path: Path) -> None:
    """Catches ``mode=0o700`` -> ``0o755`` where the agent makes its state, runtime and snapshot directories:
    they hold VM disks, guest memory snapshots, API sockets and the action journal."""
    agent = _command_agent(tmp_path)
    try:
        for d in ("state", "vms", "snaps"):
            assert oct((tmp_path / d).stat().st_mode & 0o777) == "0o700", d
    finally:
        agent.close()


def test_the_cloud_init_seed_is_private(tmp_path: Path) -> None:
    """Catches ``write_atomic``'s default ``mode=0o600`` -> ``0o644``: the seed image carries the plan's
    user-data (passwords, keys, tokens) and must not be readable by other users."""
    iso = tmp_path / "cloud-init.iso"
    write_seed_iso(str(iso), "#cloud-config\npassword: s3cret\n", "instance-id: vm-1\n", None)
    assert oct(iso.stat().st_mode & 0o777) == "0o600"


def test_within_roots_hands_back_the_resolved_path(tmp_path: Path) -> None:
    """Catches ``return real`` -> ``return path`` in ``within_roots``: the caller must use the file that was
    checked, not a symlink that can be re-pointed outside the roots between the check and the use."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux-6.1").write_text("k")
    (images / "vmlinux").symlink_to(images / "vmlinux-6.1")
    got = P.within_roots(str(images / "vmlinux"), (str(images),), "params.kernel_path")
    assert got == os.path.realpath(images / "vmlinux-6.1")


def test_a_command_gets_no_stdin() -> None:
    """Catches ``stdin=DEVNULL`` -> inherited in ``run_command``: a host command must not read (or block on)
    the agent's own standard input. The test puts a pipe on fd 0 so an inherited stdin is visible."""
    r, w = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(r, 0)
        out = run_command("/bin/sh", ["-c", "readlink /proc/self/fd/0"], cwd="/", timeout=5, allow=SH)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)
    assert out["stdout"] == "/dev/null\n"
