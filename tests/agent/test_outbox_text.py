"""Reports carry text the agent does not control; the control plane must accept them (issue 10 item 3)."""

from __future__ import annotations

import time

from nkudo.agent.daemon import outbox_messages
from nkudo.agent.executor import Outcome
from nkudo.agent.hostcmd import CommandFailed, normalise_allowlist, run_command
from nkudo.agent.plan import parse_action
from nkudo.agent.state import OutboxKind
from nkudo.wire import messages as wm
from nkudo.wire.codec import decode, storable_text
from nkudo.wire.vocab import ResultStatus

SH = normalise_allowlist(["/bin/sh"])
EXEC_ID = "0b8f6a52-6f0e-4c36-9d3f-5b1d2f0c9a11"


def test_command_output_with_nul_and_bad_bytes_reaches_the_control_plane() -> None:
    """Issue 10 item 3: the control plane now refuses NUL and lone surrogates with a 400, and the agent drops a
    report a 4xx refuses; so a command that prints a NUL or invalid UTF-8 must not cost the execution its log
    and result. The agent replaces exactly those characters and keeps the rest of the text."""
    try:
        run_command("/bin/sh", ["-c", r"printf 'a\000b\377c'; exit 3"], cwd="/", timeout=5, allow=SH)
        raise AssertionError("the command should fail")
    except CommandFailed as exc:
        failure = exc
    action = parse_action({"action_id": "cmd", "type": "CommandExecute", "execution_id": EXEC_ID,
                           "params": {"command": "/bin/sh", "args": ["-c", "x"]}})
    out = Outcome(action, ResultStatus.FAILED)
    out.error_code, out.error_message = failure.code, f"{failure.message}: {failure.result['stdout']}"
    out.logs = [{"message": "command output", "level": "INFO", "ts": time.time(),
                 "fields": {"stdout": failure.result["stdout"]}}]
    out.result = failure.result
    out.started_at = out.ended_at = time.time()
    msgs = {entry.kind: entry.payload for entry in outbox_messages(out)}
    batch = decode(msgs[OutboxKind.LOGS].encode(), wm.LogBatch)  # the control plane's own decoding
    result = decode(msgs[OutboxKind.RESULT].encode(), wm.ActionResult)
    text = " ".join(line.message for line in batch.lines)
    assert "a\ufffdb" in text and "\x00" not in text
    assert result.message.endswith("a\ufffdb\ufffdc") or "a\ufffdb" in result.message


def test_storable_text_changes_only_what_the_control_plane_refuses() -> None:
    """The cleaner must not touch ordinary text (tabs, newlines, any script) and must remove every refused char."""
    assert storable_text("tab\tnl\nü日本") == "tab\tnl\nü日本"
    assert storable_text("x\x00y\ud800z\udfff") == "x\ufffdy\ufffdz\ufffd"
