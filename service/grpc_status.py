"""Domain errors as gRPC statuses: the one mapping, used by the interceptor and by the
servicers' in-band errors (a stream's `Error`, a StepMany row).

`describe(exc)` is the (code, message) a client sees; `error_detail(exc)` the
`rnnserve.v1.ErrorDetail` (reason, seqs) that travels with it: in a failed call's binary
trailing metadata `rnnserve-error-bin`, in a stream's `Error.detail`, in a StepMany
reply's `details` (docs/protocol.md, section 9). Unexpected exceptions are logged with
their traceback and answered INTERNAL with a generic message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.service.errors import RnnserveError

__all__ = [
    "ERROR_DETAIL_KEY",
    "STATUS_CODES",
    "describe",
    "error_detail",
    "error_message",
    "error_status",
    "status_code",
]

logger = logging.getLogger(__name__)

STATUS_CODES: Mapping[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def status_code(exc: RnnserveError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.code, grpc.StatusCode.UNKNOWN)


def error_message(exc: BaseException) -> str:
    """The message with any notes (`add_note`) appended, as one line each."""
    notes = getattr(exc, "__notes__", None) or []
    return "; ".join([str(exc), *notes])


#: The trailing metadata key of a failed call's `ErrorDetail` (binary: `-bin`).
ERROR_DETAIL_KEY = "rnnserve-error-bin"


def error_detail(exc: BaseException) -> pb.ErrorDetail:
    """The machine-readable part of the status a client sees for `exc`."""
    if not isinstance(exc, RnnserveError):
        return pb.ErrorDetail(reason="INTERNAL")
    return pb.ErrorDetail(
        reason=exc.reason, current_seq=exc.current_seq, requested_seq=exc.requested_seq
    )


def error_status(exc: BaseException) -> pb.Error:
    """`exc` as a stream's in-band `Error` (code, message, detail)."""
    code, message = describe(exc)
    return pb.Error(code=code.value[0], message=message, detail=error_detail(exc))


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) a client sees for `exc`; unknown errors are INTERNAL, logged."""
    if isinstance(exc, RnnserveError):
        return status_code(exc), error_message(exc)
    logger.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
