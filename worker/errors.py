"""kmsq's error tree: one root, split into transient (retry) and permanent (reply) failures.

Each error carries a stable ``code`` (the wire error codes of the queue protocol) and a message that is safe
to show to a caller: no secret, no key material, and for integrity failures no hint of which check failed.
"""

from __future__ import annotations

from typing import ClassVar

from schemas.wire import ErrorCode


class ServiceError(Exception):
    """Root of every error kmsq raises on purpose (what a caller then gets is ``tasks.client.KmsError``)."""

    code: ClassVar[ErrorCode] = "internal"
    transient = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    default_message = "internal error"

    @property
    def message(self) -> str:
        """The caller-safe message."""
        return str(self.args[0])


class TransientError(ServiceError):
    """A failure that may go away on retry (HSM busy or restarted, database unreachable)."""

    code = "unavailable"
    transient = True
    default_message = "service temporarily unavailable"


class HsmUnavailable(TransientError):
    """The PKCS#11 session or device failed; the session is reopened on the next call."""

    default_message = "HSM temporarily unavailable"


class NotReplicated(TransientError):
    """A root key version is not yet on as many tokens as ``KMSQ_MIN_TOKENS`` asks (worker.replication): nothing is
    wrapped under it until it is, so that losing one token cannot lose what it protects."""


class DatabaseUnavailable(TransientError):
    """The database could not be reached or dropped the connection."""

    default_message = "database temporarily unavailable"


class PermanentError(ServiceError):
    """A failure that a retry will not fix."""


class ConfigError(PermanentError):
    """kmsq is misconfigured: missing PKCS#11 library, wrong PIN, bad URL, token absent."""

    code = "internal"
    default_message = "configuration error"


class InvalidRequest(PermanentError):
    """The input is malformed or out of range."""

    code = "invalid"
    default_message = "invalid request"


class VersionBelowMinimum(InvalidRequest):
    """A ciphertext under a root key version the operator no longer allows to decrypt
    (``kmsq root-key set --min-decryption-version``). Told only to a caller that may use the root key."""

    def __init__(self, root_key_id: str, version: int, minimum: int) -> None:
        super().__init__(
            f"ciphertext is under version {version} of root key {root_key_id}, below its minimum decryption "
            f"version {minimum}"
        )


class IntegrityError(PermanentError):
    """A ciphertext failed authentication. Deliberately opaque: never says which check failed."""

    code = "invalid"
    default_message = "ciphertext failed integrity check"

    def __init__(self) -> None:
        super().__init__(self.default_message)


class NotFound(PermanentError):
    """The named object does not exist (the old API's 404)."""

    code = "not_found"
    default_message = "not found"


class Conflict(PermanentError):
    """The object already exists (the old API's 409)."""

    code = "conflict"
    default_message = "already exists"


class StoredResultCorrupt(PermanentError):
    """A stored reply does not answer the request it is stored for (a row's reply copied into another's)."""

    code = "internal"
    default_message = "stored result failed integrity check"


class TooLarge(PermanentError):
    """An item of a batch whose answer does not fit the batch's reply (MAX_REPLY_SECRET_BYTES): ask for it alone."""

    code = "too_large"
    default_message = "this item's answer does not fit in the batch's reply: ask for it alone"


class HsmError(PermanentError):
    """The HSM refused an operation for a reason a retry will not change."""

    code = "internal"
    default_message = "HSM operation failed"


class Unauthenticated(PermanentError):
    """The request's caller, key or signature is not valid. Deliberately without detail to the caller."""

    code = "unauthenticated"
    default_message = "request could not be authenticated"


class NotExportable(PermanentError):
    """The key was generated inside kmsq for signing (``generate_signing_key``): it never leaves it."""

    code = "not_exportable"
    default_message = "this key was generated inside kmsq and cannot be exported"


class Forbidden(PermanentError):
    """An authenticated caller asked for something it is not allowed."""

    code = "forbidden"
    default_message = "not allowed"


class PolicyDenied(PermanentError):
    """A signing rule refused the payload (schemas.signing_rules): the message names the rule and its scope, never
    the payload."""

    code = "policy_denied"
    default_message = "a signing rule refused this payload"


class Expired(PermanentError):
    """The request is outside its validity window (allowing for the configured clock skew)."""

    code = "expired"
    default_message = "request expired or not yet valid"


class RateLimited(PermanentError):
    """The caller is over its quota (worker.quotas): nothing of the request was done; ``retry_after`` is the
    seconds until the quota takes it."""

    code = "rate_limited"
    default_message = "over the caller's quota"

    def __init__(self, retry_after: float, what: str = "requests") -> None:
        super().__init__(f"over the caller's {what} per second quota: retry after {retry_after:.3f} s")
        self.retry_after = retry_after


class Replayed(PermanentError):
    """The caller already used this request_id for a different request."""

    code = "replayed"
    default_message = "request_id already used for a different request"
