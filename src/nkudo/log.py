"""Structured logging: text or JSON lines with ``ts``, ``level``, ``msg``, ``component``.

Why not plain ``logging.getLogger``: the CLI start-up budget. Importing the
stdlib ``logging`` package costs tens of milliseconds on small edge hosts, so
``get_logger`` returns a cheap handle that checks the configured level itself
and only imports ``logging`` when a record is actually emitted. Records still
go through stdlib ``logging`` (one handler on the ``nkudo`` logger), so
libraries that log there share the same output and format.

Context fields are passed as keyword arguments (``log.info("vm started",
vm_id=...)``) or bound once (``log.bind(execution_id=...)``). Fields whose name
suggests a secret are replaced by ``"[redacted]"`` before formatting.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import IO, Any

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
FORMATS = ("text", "json")
_SECRET_MARKERS = ("token", "secret", "password", "passwd", "private_key", "api_key", "authorization")

_state: dict[str, Any] = {"level": 20, "format": "text", "stream": None, "configured": False}


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Set level and format for every nkudo logger (called once by each CLI)."""
    lvl = level.lower()
    if lvl not in LEVELS:
        raise ValueError(f"log level must be one of debug, info, warn, error (got {level!r})")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json (got {fmt!r})")
    _state.update(level=LEVELS[lvl], format=fmt, stream=stream, configured=False)
    if "logging" in sys.modules:
        _install_handler()


def is_secret_field(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in _SECRET_MARKERS)


def _redact(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop empty (None) context fields and hide secret-looking ones."""
    return {k: ("[redacted]" if is_secret_field(k) else v) for k, v in fields.items() if v is not None}


def _install_handler() -> logging.Logger:
    import logging

    root = logging.getLogger("nkudo")
    if not _state["configured"]:
        for h in list(root.handlers):
            root.removeHandler(h)
        handler = logging.StreamHandler(_state["stream"] or sys.stderr)
        handler.setFormatter(_Formatter())  # type: ignore[arg-type]  # duck-typed Formatter
        root.addHandler(handler)
        root.setLevel(_state["level"])
        root.propagate = False
        _state["configured"] = True
    return root


def format_record(ts: float, level: str, msg: str, component: str, fields: dict[str, Any], fmt: str) -> str:
    """Render one log line; pure so that tests can check both formats exactly."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
    clean = _redact(fields)
    if fmt == "json":
        import json

        return json.dumps(
            {"ts": stamp, "level": level, "msg": msg, "component": component, **clean},
            default=str,
            separators=(",", ":"),
        )
    extra = " ".join(f"{k}={_text_value(v)}" for k, v in clean.items())
    line = f"{stamp} {level.upper():5} [{component}] {msg}"
    return f"{line} {extra}" if extra else line


def _text_value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class _Formatter:
    """A ``logging.Formatter`` look-alike (duck-typed, avoids importing logging here)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "nkudo_fields", {}))
        component = getattr(record, "nkudo_component", None) or record.name.removeprefix("nkudo.")
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error", f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        level = {10: "debug", 20: "info", 30: "warn", 40: "error", 50: "error"}.get(record.levelno, "info")
        return format_record(record.created, level, msg, component, fields, _state["format"])


class Logger:
    """Cheap logger handle bound to a component and optional context fields."""

    __slots__ = ("component", "fields")

    def __init__(self, component: str, fields: dict[str, Any] | None = None) -> None:
        self.component = component
        self.fields = fields or {}

    def bind(self, **fields: Any) -> Logger:
        return Logger(self.component, {**self.fields, **fields})

    def enabled(self, level: int) -> bool:
        return bool(level >= _state["level"])

    def _emit(self, levelno: int, msg: str, fields: dict[str, Any], exc: bool = False) -> None:
        if levelno < _state["level"]:
            return
        root = _install_handler()
        root.log(
            levelno,
            "%s",
            msg,
            exc_info=exc,
            extra={"nkudo_fields": {**self.fields, **fields}, "nkudo_component": self.component},
        )

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(10, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(20, msg, fields)

    def warn(self, msg: str, **fields: Any) -> None:
        self._emit(30, msg, fields)

    warning = warn

    def error(self, msg: str, **fields: Any) -> None:
        self._emit(40, msg, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._emit(40, msg, fields, exc=True)


def get_logger(component: str, **fields: Any) -> Logger:
    return Logger(component, fields)
