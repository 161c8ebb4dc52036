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
    │   │   └── SessionRolledBack     (the store is behind the step: a lost commit)
    │   └── ModelVersionMismatch
    ├── Aborted                       ABORTED
    │   └── ConcurrentUpdate
    ├── ResourceExhausted             RESOURCE_EXHAUSTED
    │   └── QueueFull
    ├── Unavailable                   UNAVAILABLE
    │   ├── StoreUnavailable
    │   │   └── PartialStoreFailure   (some keys' nodes failed, the others answered)
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
    "PartialStoreFailure",
    "PermissionDenied",
    "QueueFull",
    "ResourceExhausted",
    "RnnserveError",
    "SeqConflict",
    "SessionNotFound",
    "SessionRolledBack",
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


class SessionRolledBack(SeqConflict):
    """The step expected a seq ahead of the stored one: steps acknowledged before are
    missing from the state store (a commit lost when Redis failed over to a replica
    that had not received it, or a session restored from an older copy).

    Nothing was applied. `stored_seq` is where the session is now, `requested_seq`
    where the step expected it, `missing` how many acknowledged steps are gone; the
    application decides (replay them from its own log, or reset the session).
    """

    reason = "SESSION_ROLLED_BACK"

    def __init__(self, session_id: str, *, stored_seq: int, requested_seq: int) -> None:
        missing = requested_seq - stored_seq
        steps = (
            f"step {requested_seq} is"
            if missing == 1
            else f"steps {stored_seq + 1} to {requested_seq} are"
        )
        super().__init__(
            f"session {session_id!r} is at seq {stored_seq} but this step expected seq "
            f"{requested_seq}: {steps} missing from the state store (a commit acknowledged "
            "earlier was lost, e.g. Redis failed over to a replica that had not received "
            "it); nothing was applied: replay the missing steps or reset the session",
            current_seq=stored_seq,
        )
        self.stored_seq = stored_seq
        self.requested_seq = requested_seq
        self.missing = missing


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


class PartialStoreFailure(StoreUnavailable):
    """A batch's store call failed on some nodes of a Redis Cluster and answered on the
    others: `failed` maps the index of each key whose node failed to its error,
    `results` holds the answers of the others (None at the failed indices). Only the
    failed keys' steps fail; the others go on."""

    def __init__(
        self, message: str, *, results: list[object], failed: dict[int, StoreUnavailable]
    ) -> None:
        super().__init__(message)
        self.results = results
        self.failed = failed


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
