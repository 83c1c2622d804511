"""Structured logging: both formats, context fields, levels, redaction."""

from __future__ import annotations

import io
import json

import pytest

from nkudo import log


@pytest.fixture(autouse=True)
def _reset() -> None:
    yield
    log.configure("info", "text")


def test_json_lines_carry_required_keys_and_context() -> None:
    buf = io.StringIO()
    log.configure("debug", "json", stream=buf)
    lg = log.get_logger("executor").bind(execution_id="ex-1")
    lg.info("action done", action_id="a1", vm_id="vm-1", duration_s=0.25)
    rec = json.loads(buf.getvalue().splitlines()[-1])
    assert rec["level"] == "info" and rec["msg"] == "action done" and rec["component"] == "executor"
    assert rec["execution_id"] == "ex-1" and rec["action_id"] == "a1" and rec["vm_id"] == "vm-1"
    assert rec["ts"].endswith("Z") and "T" in rec["ts"]


def test_text_format_and_quoting() -> None:
    buf = io.StringIO()
    log.configure("info", "text", stream=buf)
    log.get_logger("cli").warn("disk low", path="/var/lib x", free=3)
    line = buf.getvalue().strip()
    assert " WARN  [cli] disk low " in line
    assert 'path="/var/lib x"' in line and "free=3" in line


def test_level_filtering() -> None:
    buf = io.StringIO()
    log.configure("warn", "json", stream=buf)
    lg = log.get_logger("x")
    lg.info("hidden")
    lg.debug("hidden")
    lg.error("shown")
    lines = buf.getvalue().splitlines()
    assert [json.loads(x)["msg"] for x in lines] == ["shown"]
    assert not lg.enabled(20) and lg.enabled(40)


def test_secrets_are_redacted() -> None:
    buf = io.StringIO()
    log.configure("info", "json", stream=buf)
    log.get_logger("enroll").info("enrolling", token="s3cr3t", refresh_token="r", api_key="k", hostname="h1")
    out = buf.getvalue()
    assert "s3cr3t" not in out and '"r"' not in out and '"k"' not in out
    rec = json.loads(out)
    assert rec["token"] == rec["refresh_token"] == rec["api_key"] == "[redacted]"
    assert rec["hostname"] == "h1"


def test_exception_is_a_field_not_a_traceback() -> None:
    buf = io.StringIO()
    log.configure("info", "json", stream=buf)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.get_logger("x").exception("failed")
    rec = json.loads(buf.getvalue())
    assert rec["error"] == "RuntimeError: boom"


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        log.configure("loud", "text")
    with pytest.raises(ValueError, match="log format"):
        log.configure("info", "xml")
