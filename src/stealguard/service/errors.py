"""What the service refuses, as exceptions that carry their HTTP status.

The app turns each into a JSON answer `{"detail": message, ...}` with the status below;
the HTTP client turns the answers back into the same exceptions (budget: the library's
`QueryBudgetExceeded`, so attacks see one error whether the black box is local or remote).
"""

from __future__ import annotations

from typing import Any

from stealguard.errors import StealguardError


class ServiceError(StealguardError):
    """A refused request: `status` is the HTTP status, `extra` goes into the JSON answer."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.extra = extra


class AuthError(ServiceError):
    """No key, an unknown key (401) or a revoked key (403)."""

    status = 401


class RateLimited(ServiceError):
    """More images in the key's rate window than its limit (429); nothing was counted."""

    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after


class BadRequest(ServiceError):
    """The request cannot be parsed (400) or does not describe valid images (422, 413)."""
