"""The errors of `rnnserve.client`: one small hierarchy, each carrying its gRPC code and
the server's reason.

A `grpc.RpcError` never leaves the client: it is translated at the boundary with
`raise ... from exc`, so the original status stays attached as `__cause__`. The class is
chosen from the status code and the `rnnserve.v1.ErrorDetail` the server sends with
every failure (the `rnnserve-error-bin` trailing metadata, a stream's in-band `Error`,
a StepMany row), never from the message text.

    ClientError                        code (a grpc.StatusCode, or None), reason (a str)
    ├── ConnectionFailed               UNAVAILABLE / DEADLINE_EXCEEDED after every retry
    ├── InvalidRequest                 INVALID_ARGUMENT, OUT_OF_RANGE
    ├── NotFound                       NOT_FOUND (no such model, version or session)
    ├── PreconditionFailed             FAILED_PRECONDITION (`current_seq`, `requested_seq`)
    │   ├── SeqConflict                reason SEQ_CONFLICT: the session is at another seq
    │   ├── VersionMismatch            reason VERSION_MISMATCH: another model version's session
    │   └── SessionRolledBack          reason SESSION_ROLLED_BACK: the server's state store is
    │                                  behind steps it acknowledged (a lost commit)
    ├── Unauthorized                   UNAUTHENTICATED, PERMISSION_DENIED
    ├── Overloaded                     RESOURCE_EXHAUSTED
    ├── ServerError                    INTERNAL, ABORTED and anything else
    └── StepsLost                      a broken sequence cannot be resumed without losing
                                       outputs of steps the server applied (no code)
"""

from __future__ import annotations

from typing import Any

import grpc

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb

__all__ = [
    "ClientError",
    "ConnectionFailed",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "PreconditionFailed",
    "SeqConflict",
    "ServerError",
    "SessionRolledBack",
    "StepsLost",
    "Unauthorized",
    "VersionMismatch",
]

#: The trailing metadata key of a failed call's `ErrorDetail`.
ERROR_DETAIL_KEY = "rnnserve-error-bin"


class ClientError(Exception):
    """Base of every error `rnnserve.client` raises.

    `code`: the gRPC status (None for errors of the client itself). `reason`: the
    server's `ErrorDetail.reason` (e.g. `"SESSION_NOT_FOUND"`), else the code's name,
    else `"CLIENT"` for an error raised by the client before or after any call.
    """

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason or (code.name if code is not None else "CLIENT")


class ConnectionFailed(ClientError):
    """No address answered (UNAVAILABLE or DEADLINE_EXCEEDED) within the retry budget."""


class InvalidRequest(ClientError):
    """The request was refused (or never sent): names, shapes, dtypes, sizes, ids."""


class NotFound(ClientError):
    """No such model, version or session (never started, ended, or expired)."""


class PreconditionFailed(ClientError):
    """FAILED_PRECONDITION: the session is not in a state this request can apply to.

    `current_seq` / `requested_seq`: the session's seq on the server and the one the
    request expected, when the server says (None otherwise).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = grpc.StatusCode.FAILED_PRECONDITION,
        reason: str | None = None,
        current_seq: int | None = None,
        requested_seq: int | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.current_seq = current_seq
        self.requested_seq = requested_seq


class SeqConflict(PreconditionFailed):
    """The session is not where this client expected it (`current_seq` says where)."""


class VersionMismatch(PreconditionFailed):
    """The session belongs to another version of the model than the one asked for."""


class SessionRolledBack(PreconditionFailed):
    """The session is behind steps the server acknowledged: their commit was lost by
    the state store (e.g. Redis failed over to a replica that had not received it).

    Nothing was applied. The session is at `stored_seq` (also `current_seq`); this
    client expected `requested_seq`; `missing` steps are gone. Decide: replay them
    from your own log (after `info()`, which re-reads the seq), or `reset()`. Not a
    `SeqConflict`: resynchronising to the stored seq would silently skip the lost steps.
    Raised from the server's reason `SESSION_ROLLED_BACK` (code FAILED_PRECONDITION), or
    by a sequence call that finds the session behind what it acknowledged (code None).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        stored_seq: int,
        requested_seq: int,
    ) -> None:
        super().__init__(
            message,
            code=code,
            reason="SESSION_ROLLED_BACK",
            current_seq=stored_seq,
            requested_seq=requested_seq,
        )
        self.stored_seq = stored_seq
        self.missing = requested_seq - stored_seq


def rolled_back(session_id: str, *, stored_seq: int, requested_seq: int) -> SessionRolledBack:
    """The error for a session found behind the seq this client was acknowledged."""
    return SessionRolledBack(
        f"session {session_id!r} is at seq {stored_seq} but this client was acknowledged "
        f"up to seq {requested_seq}: {requested_seq - stored_seq} step(s) are missing from "
        "the server's state store",
        stored_seq=stored_seq,
        requested_seq=requested_seq,
    )


class Unauthorized(ClientError):
    """Missing or unknown token, or a session of another namespace."""


class Overloaded(ClientError):
    """The server's queues are full (RESOURCE_EXHAUSTED); try again later."""


class ServerError(ClientError):
    """Any other status: INTERNAL, ABORTED, UNIMPLEMENTED, ..."""


class StepsLost(ClientError):
    """A sequence call broke after the server applied steps whose replies never arrived.

    The session is consistent (each step applied once) but the outputs of
    `lost` step(s) cannot be fetched again: only a session's last reply is kept.
    `acknowledged` steps were returned; the session's seq is `current_seq`.
    """

    def __init__(self, message: str, *, acknowledged: int, current_seq: int) -> None:
        super().__init__(message, reason="STEPS_LOST")
        self.acknowledged = acknowledged
        self.current_seq = current_seq


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionFailed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: Unauthorized,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}

#: FAILED_PRECONDITION reasons with a class of their own.
_PRECONDITIONS: dict[str, type[PreconditionFailed]] = {
    "SEQ_CONFLICT": SeqConflict,
    "VERSION_MISMATCH": VersionMismatch,
}

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a numeric code on the wire (`Error.code`, a row's code);
    UNKNOWN for a number gRPC does not define."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def from_status(
    code: grpc.StatusCode, details: str, detail: pb.ErrorDetail | None = None
) -> ClientError:
    """The client error for a status: its code, message and `ErrorDetail` (if sent)."""
    reason = detail.reason if detail is not None and detail.reason else None
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        current = (
            int(detail.current_seq)
            if detail is not None and detail.HasField("current_seq")
            else None
        )
        requested = (
            int(detail.requested_seq)
            if detail is not None and detail.HasField("requested_seq")
            else None
        )
        if reason == "SESSION_ROLLED_BACK" and current is not None and requested is not None:
            return SessionRolledBack(
                details, code=code, stored_seq=current, requested_seq=requested
            )
        kind = _PRECONDITIONS.get(reason or "", PreconditionFailed)
        return kind(
            details,
            code=code,
            reason=reason,
            current_seq=current,
            requested_seq=requested,
        )
    return _BY_CODE.get(code, ServerError)(details, code=code, reason=reason)


def from_error_message(error: pb.Error) -> ClientError:
    """A stream's in-band `Error` as a client error."""
    detail = error.detail if error.HasField("detail") else None
    return from_status(status_code(error.code), error.message, detail)


def detail_of(metadata: Any) -> pb.ErrorDetail | None:
    """The `ErrorDetail` in a call's trailing metadata, if any (and readable)."""
    for key, value in metadata or ():
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            try:
                detail: pb.ErrorDetail = pb.ErrorDetail.FromString(value)
                return detail
            except Exception:  # a detail we cannot read: go by the status code
                return None
    return None


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """Translate a `grpc.RpcError` (sync or aio); raise the result `from exc`."""
    code_method = getattr(exc, "code", None)
    details_method = getattr(exc, "details", None)
    trailing_method = getattr(exc, "trailing_metadata", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details = details_method() if callable(details_method) else str(exc)
    detail = detail_of(trailing_method()) if callable(trailing_method) else None
    code = code or grpc.StatusCode.UNKNOWN
    return from_status(code, details or code.name, detail)
