"""Errors of the serving layer, each with the HTTP status it maps to.

Client mistakes are 4xx with a message that says what was wrong; the server never answers 500 for them.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base: `status` is the HTTP status code, `headers` extra response headers."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServingError):
    status = 400


class Unauthorized(ServingError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class Forbidden(ServingError):
    status = 403


class NotFound(ServingError):
    status = 404


class Conflict(ServingError):
    status = 409


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedMediaType(ServingError):
    status = 415


class Unprocessable(ServingError):
    status = 422


class QueueFull(ServingError):
    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, {"Retry-After": str(max(1, int(retry_after_s)))})


class ShuttingDown(ServingError):
    status = 503

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message, {"Retry-After": "1"})


class RequestTimeout(ServingError):
    status = 504
