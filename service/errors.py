"""The domain errors of rnnserve: one hierarchy, no transport imports.

Everything the service raises on purpose is an `RnnserveError`. Each class has a
`code`: the plain name of the status it stands for (`"INVALID_ARGUMENT"`, ...).
The gRPC layer maps `code` to a status code in one place; nothing here imports grpc.
Third-party exceptions (redis, TensorFlow, protobuf) are translated at the
boundary with `raise ... from exc`, so the cause stays attached.

    RnnserveError                     code
    ├── InvalidArgument               INVALID_ARGUMENT
    ├── NotFound                      NOT_FOUND
    │   ├── SessionNotFound
    │   └── ModelNotFound
    ├── FailedPrecondition            FAILED_PRECONDITION
    │   ├── SeqConflict               (carries `current_seq`)
    │   └── ModelVersionMismatch
    ├── Aborted                       ABORTED
    │   └── ConcurrentUpdate
    ├── ResourceExhausted             RESOURCE_EXHAUSTED
    │   └── QueueFull
    ├── Unavailable                   UNAVAILABLE
    │   ├── StoreUnavailable
    │   └── ShuttingDown
    ├── Unauthenticated               UNAUTHENTICATED
    ├── PermissionDenied              PERMISSION_DENIED
    ├── DeadlineExceeded              DEADLINE_EXCEEDED
    └── Internal                      INTERNAL
"""

from __future__ import annotations

__all__ = [
    "Aborted",
    "ConcurrentUpdate",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ModelNotFound",
    "ModelVersionMismatch",
    "NotFound",
    "PermissionDenied",
    "QueueFull",
    "ResourceExhausted",
    "RnnserveError",
    "SeqConflict",
    "SessionNotFound",
    "ShuttingDown",
    "StoreUnavailable",
    "Unauthenticated",
    "Unavailable",
]


class RnnserveError(Exception):
    """Base of every error the service raises on purpose."""

    code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RnnserveError):
    """The request is malformed: wrong tensor name, shape or dtype, a bad id."""

    code = "INVALID_ARGUMENT"


class NotFound(RnnserveError):
    code = "NOT_FOUND"


class SessionNotFound(NotFound):
    """No session under that key: never started, ended, or expired (idle timeout)."""


class ModelNotFound(NotFound):
    """No model (or no such version of it) is loaded."""


class FailedPrecondition(RnnserveError):
    code = "FAILED_PRECONDITION"


class SeqConflict(FailedPrecondition):
    """A step's `seq` does not match the session's: the step was not applied.

    `current_seq` is the session's step count now; a client resynchronises from it.
    """

    def __init__(self, message: str, *, current_seq: int) -> None:
        super().__init__(message)
        self.current_seq = current_seq


class ModelVersionMismatch(FailedPrecondition):
    """The session's state belongs to another version of the model than the one asked."""


class Aborted(RnnserveError):
    code = "ABORTED"


class ConcurrentUpdate(Aborted):
    """Another writer (another replica) kept winning the compare-and-set on this
    session; the step was not applied. Retrying is safe."""


class ResourceExhausted(RnnserveError):
    code = "RESOURCE_EXHAUSTED"


class QueueFull(ResourceExhausted):
    """The batcher's queue is at its bound; the client should back off and retry."""


class Unavailable(RnnserveError):
    code = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The state store could not be reached or did not answer in time.

    Nothing was half-written: a commit either applied as a whole or not at all.
    When it is unknown which (the reply was lost), a retry with the same `seq` and
    request id is answered exactly once.
    """


class ShuttingDown(Unavailable):
    """The engine (or its batcher) is closing and takes no new work."""


class Unauthenticated(RnnserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RnnserveError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(RnnserveError):
    code = "DEADLINE_EXCEEDED"


class Internal(RnnserveError):
    """A bug or an unexpected failure (e.g. the model raised); details are logged."""

    code = "INTERNAL"
