"""The domain errors of rnnserve: one hierarchy, no transport imports.

Everything the service raises on purpose is an `RnnserveError`. Each class has a
`code`: the plain name of the status it stands for (`"INVALID_ARGUMENT"`, ...), and a
`reason`: what went wrong, for programs (`"SEQ_CONFLICT"`, ...; the wire's
`rnnserve.v1.ErrorDetail.reason`, docs/protocol.md "Errors"), with `current_seq` /
`requested_seq` where a seq is the matter. The gRPC layer maps them to a status and
its detail in one place (`grpc_status.py`); nothing here imports grpc.
Third-party exceptions (redis, TensorFlow, protobuf) are translated at the
boundary with `raise ... from exc`, so the cause stays attached.

    RnnserveError                     code                  reason
    ├── InvalidArgument               INVALID_ARGUMENT      INVALID_ARGUMENT
    ├── NotFound                      NOT_FOUND             NOT_FOUND
    │   ├── SessionNotFound                                 SESSION_NOT_FOUND
    │   └── ModelNotFound                                   MODEL_NOT_FOUND
    ├── FailedPrecondition            FAILED_PRECONDITION   FAILED_PRECONDITION
    │   ├── SeqConflict                                     SEQ_CONFLICT (current/requested seq)
    │   │   └── SessionRolledBack                           SESSION_ROLLED_BACK (stored/requested:
    │   │                                                   the store is behind, a lost commit)
    │   └── ModelVersionMismatch                            VERSION_MISMATCH
    ├── Aborted                       ABORTED               ABORTED
    │   └── ConcurrentUpdate                                CONCURRENT_UPDATE
    ├── ResourceExhausted             RESOURCE_EXHAUSTED    RESOURCE_EXHAUSTED
    │   └── QueueFull                                       QUEUE_FULL
    ├── Unavailable                   UNAVAILABLE           UNAVAILABLE
    │   ├── StoreUnavailable                                STORE_UNAVAILABLE
    │   │   └── PartialStoreFailure                         STORE_UNAVAILABLE (some nodes failed)
    │   └── ShuttingDown                                    SHUTTING_DOWN
    ├── Unauthenticated               UNAUTHENTICATED       UNAUTHENTICATED
    ├── PermissionDenied              PERMISSION_DENIED     PERMISSION_DENIED
    ├── DeadlineExceeded              DEADLINE_EXCEEDED     DEADLINE_EXCEEDED
    └── Internal                      INTERNAL              INTERNAL
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
    #: A class that sets `code` but no `reason` gets the code as its reason.
    reason: str = "UNKNOWN"
    #: Where a seq is the matter (SEQ_CONFLICT): the session's seq and the one asked.
    current_seq: int | None = None
    requested_seq: int | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "reason" not in cls.__dict__ and "code" in cls.__dict__:
            cls.reason = cls.code  # a code's base class: the reason is the code

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

    reason = "SESSION_NOT_FOUND"


class ModelNotFound(NotFound):
    """No model (or no such version of it) is loaded."""

    reason = "MODEL_NOT_FOUND"


class FailedPrecondition(RnnserveError):
    code = "FAILED_PRECONDITION"


class SeqConflict(FailedPrecondition):
    """A step's `seq` does not match the session's: the step was not applied.

    `current_seq` is the session's step count now; a client resynchronises from it.
    `requested_seq` is the seq the step expected.
    """

    reason = "SEQ_CONFLICT"

    def __init__(self, message: str, *, current_seq: int, requested_seq: int | None = None) -> None:
        super().__init__(message)
        self.current_seq = current_seq
        self.requested_seq = requested_seq


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
            requested_seq=requested_seq,
        )
        self.stored_seq = stored_seq
        self.missing = missing


class ModelVersionMismatch(FailedPrecondition):
    """The session's state belongs to another version of the model than the one asked."""

    reason = "VERSION_MISMATCH"


class Aborted(RnnserveError):
    code = "ABORTED"


class ConcurrentUpdate(Aborted):
    """Another writer (another replica) kept winning the compare-and-set on this
    session; the step was not applied. Retrying is safe."""

    reason = "CONCURRENT_UPDATE"


class ResourceExhausted(RnnserveError):
    code = "RESOURCE_EXHAUSTED"


class QueueFull(ResourceExhausted):
    """The batcher's queue is at its bound; the client should back off and retry."""

    reason = "QUEUE_FULL"


class Unavailable(RnnserveError):
    code = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The state store could not be reached or did not answer in time.

    Nothing was half-written: a commit either applied as a whole or not at all.
    When it is unknown which (the reply was lost), a retry with the same `seq` and
    request id is answered exactly once.
    """

    reason = "STORE_UNAVAILABLE"


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

    reason = "SHUTTING_DOWN"


class Unauthenticated(RnnserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RnnserveError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(RnnserveError):
    code = "DEADLINE_EXCEEDED"


class Internal(RnnserveError):
    """A bug or an unexpected failure (e.g. the model raised); details are logged."""

    code = "INTERNAL"
