"""What the service refuses, as exceptions that carry their HTTP status and a refusal code.

The app turns each into a JSON answer `{"detail": message, "code": code, ...}` with the
status below, records it in the audit log under its code, and counts it in /metrics; the
HTTP client turns the answers back into the same exceptions (budget: the library's
`QueryBudgetExceeded`, so attacks see one error whether the black box is local or remote).

`REFUSALS` is the one table of codes: status and meaning. A client can tell "retry later"
(429 rate_limited, with Retry-After) from "never" (403 budget_exhausted, 413
batch_over_rate_limit) by the status alone.
"""

from __future__ import annotations

from typing import Any

from stealguard.errors import StealguardError

REFUSALS: dict[str, tuple[int, str]] = {
    "malformed_json": (400, "the body is not JSON"),
    "bad_image": (400, "bad base64, or bytes that are not a PNG/JPEG image"),
    "missing_key": (401, "no API key"),
    "unknown_key": (401, "an API key the service does not know"),
    "conflicting_credentials": (401, "X-API-Key and Authorization name different keys, or "
                                     "Authorization is not `Bearer <key>`"),
    "revoked_key": (403, "a revoked API key"),
    "budget_exhausted": (403, "the batch does not fit in the key's remaining budget; never "
                              "retry it as is"),
    "detection_locked": (403, "the detection policy locked this key (stealguard.detect)"),
    "read_timeout": (408, "the request was not received in time"),
    "body_too_large": (413, "the body is over the size limit"),
    "too_many_images": (413, "more images than the per-request limit"),
    "batch_over_rate_limit": (413, "more images than the key's rate window allows; send "
                                   "smaller batches"),
    "unsupported_media_type": (415, "Content-Type is not application/json"),
    "image_format": (415, "an image format other than PNG or JPEG"),
    "invalid_request": (422, "fields, types or structure the schema does not allow"),
    "invalid_image": (422, "wrong image size or channels (checked from the header)"),
    "invalid_pixels": (422, "wrong shape, value range, or NaN/inf pixels"),
    "rate_limited": (429, "the key's rate window is full; retry after Retry-After"),
    "detection_throttled": (429, "the detection policy throttles this key; retry after "
                                 "Retry-After"),
    "header_too_large": (431, "request headers over the size or count limit"),
    "client_disconnected": (499, "the client closed the connection before the body arrived"),
}


class ServiceError(StealguardError):
    """A refused request: `status` is the HTTP status, `code` a key of REFUSALS, `extra`
    goes into the JSON answer."""

    status: int = 400
    code: str = "malformed_json"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        if code is not None:
            if code not in REFUSALS:
                raise ValueError(f"unknown refusal code {code!r}")
            self.code = code
            self.status = REFUSALS[code][0]
        if status is not None:
            self.status = status
        self.extra = extra


class AuthError(ServiceError):
    """No key, an unknown or conflicting key (401) or a revoked key (403)."""

    status = 401
    code = "unknown_key"


class RateLimited(ServiceError):
    """More images in the key's rate window than its limit (429); nothing was counted."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after


class BadRequest(ServiceError):
    """The request cannot be parsed (400) or does not describe valid images (422, 413, 415);
    give `code` (a key of REFUSALS) and the status follows from it."""


class ClientGone(ServiceError):
    """The client closed the connection, or sent its body too slowly, before the request
    was read: nothing to answer, logged once and recorded."""

    status = 499
    code = "client_disconnected"
