"""The one error shape every layer uses: a stable code plus a sentence.

Codes are what tests, the control plane and operators' scripts match on;
messages name the offending field or object so the operator knows what to fix.
"""

from __future__ import annotations


class NkudoError(Exception):
    """Base error: ``code`` is stable, ``message`` is for humans."""

    code = "INTERNAL"

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
