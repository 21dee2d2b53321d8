"""The one domain error hierarchy; servicer/grpc_errors.py maps it to gRPC once."""

from __future__ import annotations


class ImagegateError(Exception):
    """Base of every error the service reports to a caller on purpose."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameter(ImagegateError):
    """A parameter is missing or has a value the model does not accept."""

    reason = "INVALID_PARAMETER"

    def __init__(self, message: str, *, param: str, missing: bool = False) -> None:
        super().__init__(message, param=param)
        self.missing = missing


class InvalidBody(ImagegateError):
    """An upload body (edits, variations) that cannot be read at all; `code` says how
    it was sent: "invalid_multipart" or "invalid_json"."""

    reason = "INVALID_BODY"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class UploadTooLarge(ImagegateError):
    """An input image over its model's size cap (a 413 naming the field)."""

    reason = "UPLOAD_TOO_LARGE"

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message, param=param)


class ModelNotSupported(ImagegateError):
    reason = "MODEL_NOT_SUPPORTED"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class ModelNotFound(ImagegateError):
    """GET /v1/models/{id} for a model that does not exist or the caller's key may not use:
    one answer for both, so a limited key cannot learn which other models exist."""

    reason = "MODEL_NOT_FOUND"


class ContentPolicy(ImagegateError):
    """The upstream refused the prompt; never retried on another model."""

    reason = "CONTENT_POLICY"


class InvalidApiKey(ImagegateError):
    reason = "INVALID_API_KEY"


class AdminRequired(ImagegateError):
    """An account's API key on the AdminService: it is a key, but not an admin key."""

    reason = "ADMIN_REQUIRED"


class AccountNotFound(ImagegateError):
    reason = "ACCOUNT_NOT_FOUND"

    def __init__(self, message: str, *, param: str = "account") -> None:
        super().__init__(message, param=param)


class AccountTaken(ImagegateError):
    """A new account's name is in use."""

    reason = "ACCOUNT_EXISTS"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="name")


class KeyNotFound(ImagegateError):
    """No such key id, or (for an account's own keys) one of another account."""

    reason = "KEY_NOT_FOUND"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="key_id")


class ModelNotAllowed(ImagegateError):
    reason = "MODEL_NOT_ALLOWED"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class InsufficientBalance(ImagegateError):
    reason = "INSUFFICIENT_BALANCE"


class IdempotencyConflict(ImagegateError):
    """An Idempotency-Key reused with a different request."""

    reason = "IDEMPOTENCY_CONFLICT"


class IdempotencyInFlight(IdempotencyConflict):
    """The key's request is still running and the caller's deadline ends first."""


class RateLimited(ImagegateError):
    reason = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamError(ImagegateError):
    """The provider failed: 5xx, timeout, bad reply, unreachable, or refused our credentials.

    `retryable` says whether the same route may be tried again (429, 5xx,
    connection errors, timeouts); a non-retryable one (credentials refused, a
    reply that makes no sense) still fails over to the next route.
    """

    reason = "UPSTREAM_ERROR"

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ImagegateError):
    """The caller's deadline passed while the upstream was still working: the same 504
    that gRPC itself answers when a deadline passes, whichever of the two ends first."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self) -> None:
        super().__init__("The request timed out before the images were ready.")


class UpstreamRejected(InvalidParameter):
    """The upstream refused the request itself (not a safety refusal): a 400 for the
    caller, never retried and never failed over, since every route would refuse it."""

    def __init__(self, message: str, *, param: str = "prompt") -> None:
        super().__init__(message, param=param)


class ImageNotFound(ImagegateError):
    """Unknown image, bad signature or expired link: all look the same to the caller."""

    reason = "IMAGE_NOT_FOUND"
