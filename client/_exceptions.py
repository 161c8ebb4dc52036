"""The errors of `rnnserve.client`: one small hierarchy, each carrying its gRPC code.

A `grpc.RpcError` never leaves the client: it is translated at the boundary with
`raise ... from exc`, so the original status stays attached as `__cause__`.

    ClientError                        code (a grpc.StatusCode, or None)
    ├── ConnectionFailed               UNAVAILABLE / DEADLINE_EXCEEDED after every retry
    ├── InvalidRequest                 INVALID_ARGUMENT, OUT_OF_RANGE
    ├── NotFound                       NOT_FOUND (no such model, version or session)
    ├── SeqConflict                    FAILED_PRECONDITION (carries `current_seq`)
    ├── SessionRolledBack              FAILED_PRECONDITION: the server's state store is
    │                                  behind steps it acknowledged (a lost commit)
    ├── Unauthorized                   UNAUTHENTICATED, PERMISSION_DENIED
    ├── Overloaded                     RESOURCE_EXHAUSTED
    ├── ServerError                    INTERNAL, ABORTED and anything else
    └── StepsLost                      a broken sequence cannot be resumed without losing
                                       outputs of steps the server applied (no code)
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "ClientError",
    "ConnectionFailed",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "SeqConflict",
    "ServerError",
    "SessionRolledBack",
    "StepsLost",
    "Unauthorized",
]

_SEQ_IN_MESSAGE = re.compile(r"is at seq (\d+)")
_ROLLED_BACK = re.compile(r"is at seq (\d+) but this step expected seq (\d+)")


class ClientError(Exception):
    """Base of every error `rnnserve.client` raises."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ConnectionFailed(ClientError):
    """No address answered (UNAVAILABLE or DEADLINE_EXCEEDED) within the retry budget."""


class InvalidRequest(ClientError):
    """The server rejected the request: names, shapes, dtypes, sizes, ids."""


class NotFound(ClientError):
    """No such model, version or session (never started, ended, or expired)."""


class SeqConflict(ClientError):
    """The session is not where this client expected it (`current_seq` says where)."""

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, current_seq: int | None
    ) -> None:
        super().__init__(message, code=code)
        self.current_seq = current_seq


class SessionRolledBack(ClientError):
    """The session is behind steps the server acknowledged: their commit was lost by
    the state store (e.g. Redis failed over to a replica that had not received it).

    Nothing was applied. The session is at `stored_seq` (also `current_seq`); this
    client expected `requested_seq`; `missing` steps are gone. Decide: replay them
    from your own log (after `info()`, which re-reads the seq), or `reset()`.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        stored_seq: int,
        requested_seq: int,
    ) -> None:
        super().__init__(message, code=code)
        self.stored_seq = stored_seq
        self.requested_seq = requested_seq
        self.missing = requested_seq - stored_seq

    @property
    def current_seq(self) -> int:
        return self.stored_seq


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
        super().__init__(message)
        self.acknowledged = acknowledged
        self.current_seq = current_seq


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionFailed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: Unauthorized,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a numeric code on the wire (`Error.code`, a row's code);
    UNKNOWN for a number gRPC does not define."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, details: str) -> ClientError:
    """The client error for a status (code + message), e.g. from a stream's `Error`."""
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        gap = _ROLLED_BACK.search(details)
        if gap:
            stored, requested = int(gap.group(1)), int(gap.group(2))
            return SessionRolledBack(details, code=code, stored_seq=stored, requested_seq=requested)
        match = _SEQ_IN_MESSAGE.search(details)
        current = int(match.group(1)) if match else None
        return SeqConflict(details, code=code, current_seq=current)
    return _BY_CODE.get(code, ServerError)(details, code=code)


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """Translate a `grpc.RpcError` (sync or aio); raise the result `from exc`."""
    code_method = getattr(exc, "code", None)
    details_method = getattr(exc, "details", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details = details_method() if callable(details_method) else str(exc)
    return from_status(code or grpc.StatusCode.UNKNOWN, details or code.name)
