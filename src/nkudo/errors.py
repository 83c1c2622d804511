"""The one error shape every layer uses: a stable code plus a sentence.

Codes are what tests, the control plane and operators' scripts match on;
messages name the offending field or object so the operator knows what to fix.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only (postponed): importing typing costs milliseconds at start-up
    from typing import ClassVar


class NkudoError(Exception):
    """Base error: ``code`` is stable, ``message`` is for humans.

    ``is_timeout`` and ``is_retryable`` are properties of the error *type*, not
    of its code string: the executor reports ``TIMED_OUT`` for any error whose
    class says it is a timeout, so a new provider's timeout error only has to
    set the flag (a list of code strings missed ``QMP_TIMEOUT``, issue 10 item 14).
    """

    code = "INTERNAL"
    #: The operation ran out of time (it may still complete on the other side).
    is_timeout: ClassVar[bool] = False
    #: Trying the same operation again may succeed (a timeout or a transient transport failure).
    is_retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ValidationError(NkudoError):
    """Input (CLI, file, plan, network) failed validation; nothing was changed."""

    code = "INVALID_ARGUMENT"


class HostError(NkudoError):
    """The host lacks something or refused an operation."""

    code = "HOST_ERROR"


class UsageError(NkudoError):
    """The command line is inconsistent (exit code 2, like click's own usage errors)."""

    code = "USAGE"
