"""rnnserve.client: a small Python SDK for rnnserve's native gRPC API.

    from rnnserve.client import Client

    with Client("localhost:8001") as client:
        session = client.session("char_lstm")
        logits = session.step(3)                 # one timestep
        all_logits = session.run([3, 1, 4, 1])   # T timesteps, (T, ...) back
        session.end()
        # the next step of K sessions in one message: inputs (K, ...), a status per row
        ids = [client.session("char_lstm").session_id for _ in range(2)]
        result = client.step_many("char_lstm", ids, [3, 1])
        result.outputs, result.seqs, result.ok, result.errors()

Every step carries the session's `seq` and a request id, so a step retried after
UNAVAILABLE / DEADLINE_EXCEEDED (on the same replica or the next address) is applied
exactly once. `AsyncClient` is the asyncio twin. Errors are `ClientError`s, chosen
from the status code and the server's reason (`.reason`), never from message text.
"""

from rnnserve.client._async import AsyncClient, AsyncSession, ManyStream
from rnnserve.client._convert import convert
from rnnserve.client._exceptions import (
    ClientError,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    PreconditionFailed,
    SeqConflict,
    ServerError,
    SessionRolledBack,
    StepsLost,
    Unauthorized,
    VersionMismatch,
)
from rnnserve.client._models import (
    ExportedState,
    ManyResult,
    ModelInfo,
    RetryPolicy,
    SessionInfo,
    Signature,
    TensorSpec,
)
from rnnserve.client._sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "ExportedState",
    "InvalidRequest",
    "ManyResult",
    "ManyStream",
    "ModelInfo",
    "NotFound",
    "Overloaded",
    "PreconditionFailed",
    "RetryPolicy",
    "SeqConflict",
    "ServerError",
    "Session",
    "SessionInfo",
    "SessionRolledBack",
    "Signature",
    "StepsLost",
    "TensorSpec",
    "Unauthorized",
    "VersionMismatch",
    "convert",
]
