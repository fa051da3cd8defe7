"""Every error the gateway can answer with, rooted at `GatewayError`.

Owns the status, OpenAI `type` and `code` of each failure and its OpenAI-shaped JSON body.
Must not render HTTP responses (`http_edge`, around every route, does) nor hold secrets or prompt
text in messages.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of all gateway errors; `body()` is what the client receives."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.error_code = code if code is not None else self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.error_code,
            }
        }


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContentPolicyError(InvalidRequestError):
    code = "content_policy_violation"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class CredentialError(AuthenticationError):
    """A credential was missing, malformed or refused.

    `reason` is a short fixed label for security logs (`expired`, `revoked`...), never the
    credential itself.
    """

    def __init__(self, message: str, *, reason: str, code: str = "invalid_api_key") -> None:
        super().__init__(message, code=code)
        self.reason = reason


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(GatewayError):
    """Over a rate limit; `retry_after` seconds go into the `Retry-After` header."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None):
        merged = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
        merged.update(headers or {})
        super().__init__(message, headers=merged)
        self.retry_after = retry_after


class AuthLockoutError(RateLimitError):
    """Too many failed authentications from one address: it waits out a cool-down."""

    code = "too_many_failed_authentications"


class QuotaExceededError(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


class UpstreamError(GatewayError):
    """The provider refused or dropped the connection, or answered garbage."""

    status = 502
    type = "server_error"
    code = "upstream_unavailable"


class ServiceUnavailableError(GatewayError):
    """A dependency the gateway needs (Redis, redactor, policy set) is unavailable: fail closed."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamTimeoutError(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamStatusError(GatewayError):
    """The provider answered with an error status; its body is passed through as it came."""

    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, status: int, body: dict[str, Any], *, headers: dict[str, str] | None = None):
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        message = str(error.get("message") or f"The provider answered with status {status}.")
        super().__init__(message, headers=headers, code=error.get("code"))
        self.upstream_status = status
        self.upstream_body = body

    @property
    def status_code(self) -> int:
        return self.upstream_status

    def body(self) -> dict[str, Any]:
        return self.upstream_body


def status_of(error: GatewayError) -> int:
    """The HTTP status to answer with (upstream errors keep the provider's status)."""
    if isinstance(error, UpstreamStatusError):
        return error.upstream_status
    return error.status
