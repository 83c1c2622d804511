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

Log lines can be built from request data, so two limits hold for every line
(issue 10 item 5, a 115 kB line from one malformed request): the message and
each field value are cut at ``VALUE_CAP`` characters with a note saying how much
was cut, and a warning or error identical to one logged in the last
``REPEAT_WINDOW`` seconds is counted instead of printed, then reported once as
``repeated=N``. Library loggers (aiohttp, asyncio) can be routed through the same
handler with ``adopt`` so their records get the same treatment.
"""

from __future__ import annotations

import _thread  # the lock only: ``threading`` costs milliseconds on every command's import path
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
#: Longest message or field value printed; longer ones are cut and say so.
VALUE_CAP = 1024
#: Seconds during which a repeated identical warning/error is counted rather than printed.
REPEAT_WINDOW = 30.0
#: Most distinct repeated lines tracked at once (bounded memory); past it lines are printed untracked.
REPEAT_KEYS = 4096


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Set level and format for every nkudo logger (called once by each CLI)."""
    lvl = level.lower()
    if lvl not in LEVELS:
        raise ValueError(f"log level must be one of debug, info, warn, error (got {level!r})")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json (got {fmt!r})")
    _state.update(level=LEVELS[lvl], format=fmt, stream=stream, configured=False)
    _repeats.reset()  # a new destination has seen nothing yet: its first line of each kind is printed
    if "logging" in sys.modules:
        _install_handler()


def is_secret_field(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in _SECRET_MARKERS)


def _redact(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop empty (None) context fields and hide secret-looking ones."""
    return {k: ("[redacted]" if is_secret_field(k) else v) for k, v in fields.items() if v is not None}


def cap(value: str, limit: int = VALUE_CAP) -> str:
    """``value`` cut to ``limit`` characters, saying how many were cut (never a silent truncation)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[cut {len(value) - limit} chars]"


class _Repeats:
    """Which warnings/errors to print: the first of identical lines per window; the rest are counted.

    A line is identical when its logger, level, message, fields (the source address among them) and
    exception type are; the exception's text is left out because it may echo request data that varies.
    When a window ends the count is printed once as the same line with ``repeated=N``: on the next record
    or on ``flush_repeats`` (the control plane calls it every second).
    """

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        # key -> (window start, suppressed count, the first record of the window)
        self.seen: dict[tuple[Any, ...], tuple[float, int, Any]] = {}

    def admit(self, key: tuple[Any, ...], record: Any, now: float) -> tuple[bool, list[Any]]:
        """(print this record?, expired records whose suppressed count must be printed now)."""
        with self.lock:
            due = self._expired(now)
            entry = self.seen.get(key)
            if entry is not None:
                self.seen[key] = (entry[0], entry[1] + 1, entry[2])
                return False, due
            if len(self.seen) >= REPEAT_KEYS:
                return True, due  # table full: print untracked (each line is capped) rather than lose it
            self.seen[key] = (now, 0, record)
            return True, due

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()

    def _expired(self, now: float) -> list[Any]:
        due = []
        for key, (start, count, rec) in list(self.seen.items()):
            if now - start >= REPEAT_WINDOW:
                del self.seen[key]
                if count:
                    due.append((rec, count))
        return due

    def expired(self, now: float) -> list[Any]:
        with self.lock:
            return self._expired(now)


_repeats = _Repeats()


def _record_key(record: logging.LogRecord) -> tuple[Any, ...]:
    fields = getattr(record, "nkudo_fields", {})
    exc = record.exc_info[1] if record.exc_info else None
    return (record.name, record.levelno, record.getMessage(), repr(sorted(fields.items(), key=lambda kv: kv[0])),
            type(exc).__name__ if exc is not None else None)


def _make_handler(stream: IO[str]) -> logging.Handler:
    import logging

    class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
        """Stream handler that summarises repeated warnings and errors (see ``_Repeats``)."""

        def handle(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.WARNING:
                return bool(super().handle(record))
            show, due = _repeats.admit(_record_key(record), record, time.monotonic())
            for rec, count in due:
                self.summarise(rec, count)
            return bool(super().handle(record)) if show else False

        def summarise(self, rec: logging.LogRecord, count: int) -> None:
            """Print ``rec`` again with ``repeated=count`` (bypassing the summariser)."""
            summary = logging.makeLogRecord(rec.__dict__)
            summary.nkudo_fields = {**getattr(rec, "nkudo_fields", {}), "repeated": count,
                                    "window_s": int(REPEAT_WINDOW)}
            summary.created = time.time()
            super().handle(summary)

    handler = _Handler(stream)
    handler.setFormatter(_Formatter())  # type: ignore[arg-type]  # duck-typed Formatter
    return handler


def _emit_summary(handler: logging.Handler, rec: logging.LogRecord, count: int) -> None:
    summarise = getattr(handler, "summarise", None)
    if summarise is not None:
        summarise(rec, count)


def flush_repeats() -> None:
    """Print the counts of repeated lines whose window has ended (call periodically in long-running daemons)."""
    if not _state["configured"]:
        return
    root = _install_handler()
    due = _repeats.expired(time.monotonic())
    for h in root.handlers:
        for rec, count in due:
            _emit_summary(h, rec, count)


def adopt(*names: str) -> None:
    """Route library loggers (e.g. ``aiohttp``) through the nkudo handler: same format, caps and summaries.

    Why: aiohttp logs a malformed request with its exception text, which can hold the request data; without
    a handler those records reach Python's last-resort handler uncapped, with a full traceback.
    """
    import logging

    root = _install_handler()
    for name in names:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        for h in root.handlers:
            lg.addHandler(h)
        lg.setLevel(max(_state["level"], logging.WARNING))
        lg.propagate = False


def _install_handler() -> logging.Logger:
    import logging

    root = logging.getLogger("nkudo")
    if not _state["configured"]:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(_make_handler(_state["stream"] or sys.stderr))
        root.setLevel(_state["level"])
        root.propagate = False
        _state["configured"] = True
    return root


def format_record(ts: float, level: str, msg: str, component: str, fields: dict[str, Any], fmt: str) -> str:
    """Render one log line; pure so that tests can check both formats exactly."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
    clean = {k: _capped(v, fmt) for k, v in _redact(fields).items()}
    msg = cap(msg)
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


def _capped(v: Any, fmt: str) -> Any:
    """``v`` itself if short; else its text cut to ``VALUE_CAP`` (structured values stay structured in JSON)."""
    if isinstance(v, int | float | bool):
        return v
    if isinstance(v, str):
        return cap(v)
    if fmt == "json":
        import json

        return v if len(json.dumps(v, default=str)) <= VALUE_CAP else cap(str(v))
    return cap(str(v))


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
