"""Control-plane errors: each maps to one HTTP status and a stable code.

Why not raise HTTP exceptions from the service layer: the same operations run
behind the HTTP adapter, the CLI and tests; the status is a property of the
error kind, chosen once here.
"""

from __future__ import annotations

from nkudo.errors import NkudoError, ValidationError


class ApiError(NkudoError):
    status = 500


class BadRequest(ApiError, ValidationError):
    status = 400
    code = "INVALID_ARGUMENT"


class Unauthenticated(ApiError):
    status = 401
    code = "UNAUTHENTICATED"


class Forbidden(ApiError):
    status = 403
    code = "FORBIDDEN"


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"


class Conflict(ApiError):
    status = 409
    code = "CONFLICT"


class PayloadTooLarge(ApiError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class TooManyRequests(ApiError):
    """Refused for now: the answer carries ``Retry-After`` (seconds) computed from the bucket or the lock."""

    status = 429
    code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None, field: str | None = None,
                 route_class: str | None = None) -> None:
        super().__init__(message, code=code or self.code, field=field)
        self.retry_after = retry_after
        self.route_class = route_class


class Unavailable(ApiError):
    status = 503
    code = "UNAVAILABLE"


def status_of(exc: NkudoError) -> int:
    """HTTP status for any nkudo error (validation errors from other layers are 400)."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, ValidationError):
        return 400
    return 500
