"""The blocking client: `Client` and its `Session` handles (the transport of `_core.py`).

with Client(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
    session = client.session("lstm")
    y = session.step(x)               # seq + request id: exactly-once on retries
    ys = session.run(xs)              # (T, ...) in, (T, ...) out
    session.end()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc

from rnnserve.client._core import (
    ClientCore,
    ManyOptions,
    ResetOptions,
    SessionCore,
    StartOptions,
)
from rnnserve.client._models import (
    ExportedState,
    Inputs,
    ManyResult,
    ModelInfo,
    Outputs,
    SessionInfo,
    Signature,
    simplify,
    stack_outputs,
)
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

__all__ = ["Client", "ProgressCallback", "Session"]

#: `(done, total)` after each step of `run`/`stream`.
ProgressCallback = Callable[[int, int], None]


class Client(ClientCore):
    """A connection to one or more rnnserve replicas (they share one state store).

    `addresses`: `"host:port"`, a comma-separated list, or a sequence. Calls go to
    one address at a time; on UNAVAILABLE or DEADLINE_EXCEEDED the call is retried
    on the next address (round robin) after a backoff, at most `retry.attempts`
    times in all. Steps carry the session's seq and a request id, so a retried step
    is applied once: if the first try was applied, the server replays its reply.
    `timeout`: seconds per attempt of a unary call; `stream_timeout` bounds a whole
    streaming call (default: none, a long sequence may take long). `token`: sent as
    `authorization: Bearer <token>`. `tls`: True for TLS with the system's roots, or
    `grpc.ssl_channel_credentials(...)` for your own CA / client certificate (mTLS).
    `interceptors`: grpc client interceptors wrapped around every channel.
    """

    # -- transport ------------------------------------------------------------------
    def _stub(self) -> Any:
        self.check_open()
        channel = self._channels.get(self._current)
        if channel is None:
            if self._credentials is None:
                channel = grpc.insecure_channel(self.address, options=self._options)
            else:
                channel = grpc.secure_channel(self.address, self._credentials, self._options)
            if self._interceptors:
                channel = grpc.intercept_channel(channel, *self._interceptors)
            self._channels[self._current] = channel
        return pb_grpc.RecurrentStub(channel)  # type: ignore[no-untyped-call]

    def _call(self, method: str, request: Any) -> Any:
        """A unary call with retries; the same request message is sent every time."""
        attempts = self.unary_attempts()
        while True:
            used = self._current
            try:
                return getattr(self._stub(), method)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                time.sleep(attempts.failed(exc, used))

    def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        reply = self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo(m.name, tuple(m.versions), m.default_version) for m in reply.models]

    def signature(self, model: str, version: str | None = None) -> Signature:
        """The model version's signature (a named version's is cached per client; the
        default version is asked each time, so the client follows a new default)."""
        return self._signature(model, version)

    def _signature(
        self, model: str, version: str | None, *, default_cached: bool = False
    ) -> Signature:
        cached = self.cached_signature(model, version, default_cached=default_cached)
        if cached is not None:
            return cached
        reply = self._call("GetModelSignature", self.signature_request(model, version))
        return self.remember_signature(reply, asked=version)

    # -- sessions -------------------------------------------------------------------
    def session(
        self, model: str, session_id: str | None = None, **options: Unpack[StartOptions]
    ) -> Session:
        """Start a session (a new id unless given; an existing one is overwritten).

        The id is chosen here when not given, so a retried start is harmless.
        """
        signature = self.signature(model, options.get("version"))
        request = self.start_request(signature, session_id, options)
        reply = self._call("StartSession", request)
        return Session(self, signature, SessionInfo.from_message(reply.session))

    def attach(self, model: str, session_id: str) -> Session:
        """A handle on an existing session (e.g. started by another process), at its seq."""
        info = self._get_session(model, session_id)
        return Session(self, self.signature(model, info.version), info)

    def import_session(self, model: str, session_id: str, record: bytes | ExportedState) -> Session:
        """Create (or overwrite) `session_id` from an exported record."""
        reply = self._call("ImportState", self.import_request(model, session_id, record))
        info = SessionInfo.from_message(reply)
        return Session(self, self.signature(model, info.version), info)

    def step_many(
        self,
        model: str,
        session_ids: Sequence[str],
        inputs: Inputs,
        *,
        version: str | None = None,
        **options: Unpack[ManyOptions],
    ) -> ManyResult:
        """The next step of each of K sessions in one `StepMany` message.

        `inputs`: arrays shaped (K, ...), one array (one-input models) or a mapping by
        input name; row k is the step of `session_ids[k]` (a session may have several
        rows: consecutive steps, in row order). `seqs`: the seq each row advances from
        (None: that row applies in arrival order). `request_ids`: one per row (default:
        fresh ones), so a message resent with the same seqs and ids is applied once
        (only a session's last reply is kept: after a retry, the earlier rows of a
        session with several rows are `SeqConflict`s, applied but their outputs lost).
        Rows fail on their own (`ManyResult.codes`, `.errors()`); a message the server
        cannot read as K rows raises. Retried like every unary call (UNAVAILABLE,
        DEADLINE_EXCEEDED). `Session` handles of these sessions do not see the steps:
        their `info()` re-reads the seq.
        """
        signature = self._signature(model, version, default_cached=True)
        request = self.many_request(signature, session_ids, inputs, options)
        return ManyResult.from_message(self._call("StepMany", request))

    def end_session(self, model: str, session_id: str) -> bool:
        """End (delete) a session by id; False if there was none (ending twice is fine)."""
        ref = pb.SessionRef(model=model, session_id=session_id)
        return bool((self._call("EndSession", ref)).existed)

    def _get_session(self, model: str, session_id: str) -> SessionInfo:
        reply = self._call("GetSession", pb.SessionRef(model=model, session_id=session_id))
        return SessionInfo.from_message(reply)


class Session(SessionCore):
    """One server-side session. Not thread-safe: step it from one thread at a time.

    `seq` is the session's step count as this handle last saw it; every step sends
    it, so a step from a stale handle fails with `SeqConflict` instead of applying
    out of order. `info()` re-reads it from the server.
    """

    def __init__(self, client: Client, signature: Signature, info: SessionInfo) -> None:
        super().__init__(signature, info)
        self.client = client

    def _resynced(self) -> None:
        if self.seq_unknown:
            self.info()

    def step(self, x: Inputs) -> Outputs:
        """One timestep: an array (one-input models) or arrays by input name."""
        self._resynced()
        return simplify(self.step_done(self.client._call("Step", self.step_request(x))))

    def stream(self, xs: Inputs, *, on_step: ProgressCallback | None = None) -> Iterator[Outputs]:
        """Outputs of each step of a `(T, ...)` sequence as soon as it is applied.

        Travels as RunSequenceStream. If the call breaks (UNAVAILABLE), the client
        asks the session's seq (on the next address) and resumes after the last
        acknowledged step: a step the server applied whose reply was lost is fetched
        again as a replay. Only if more than one such step was lost (the server runs
        ahead of the client) does it raise `StepsLost`.
        """
        for outputs in self._iter_sequence(xs, on_step):
            yield simplify(outputs)

    def run(self, xs: Inputs, *, on_step: ProgressCallback | None = None) -> Outputs:
        """All outputs of a `(T, ...)` sequence, stacked `(T, ...)`; resumes like `stream`."""
        steps = list(self._iter_sequence(xs, on_step))
        return stack_outputs(steps, self.signature.outputs)

    def _iter_sequence(
        self, xs: Inputs, on_step: ProgressCallback | None
    ) -> Iterator[dict[str, Any]]:
        self._resynced()
        run = self.sequence(xs, self.client.retry.attempts)
        while (request := run.next_call()) is not None:
            call: Any = None
            try:
                call = self.client._stub().RunSequenceStream(
                    request, timeout=self.client.stream_timeout, metadata=self.client._metadata
                )
                for reply in call:
                    outputs = run.reply(reply)
                    if on_step is not None:
                        on_step(run.acked, run.total)
                    yield outputs
                continue
            except grpc.RpcError as exc:
                time.sleep(self.client.failover(run.failed(exc)))
            finally:
                if call is not None and not run.done:
                    call.cancel()
            replay = run.resync(self.info())
            if replay is not None:
                outputs = run.replayed(self.client._call("Step", replay))
                if on_step is not None:
                    on_step(run.acked, run.total)
                yield outputs

    def info(self) -> SessionInfo:
        """The session as the server has it now (also updates `seq`)."""
        return self.synced(self.client._get_session(self.model, self.session_id))

    def reset(self, **options: Unpack[ResetOptions]) -> SessionInfo:
        """Back to seq 0 and initial states (constants kept unless given)."""
        request = self.reset_request(options)
        return self.synced(SessionInfo.from_message(self.client._call("ResetSession", request)))

    def end(self) -> bool:
        """Delete the session on the server; False if it was already gone."""
        return bool(self.client._call("EndSession", self.ref()).existed)

    def export(self) -> ExportedState:
        """The session's record (portable bytes) plus its states and constants."""
        exported = ExportedState.from_message(self.client._call("ExportState", self.ref()))
        self.seq = exported.info.seq
        return exported

    def import_(self, record: bytes | ExportedState) -> SessionInfo:
        """Replace this session with an exported record (its seq comes along)."""
        reply = self.client._call("ImportState", self.import_request(record))
        return self.synced(SessionInfo.from_message(reply))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Ends the session."""
        self.end()
