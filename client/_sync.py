"""The blocking client: `Client` and its `Session` handles.

with Client(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
    session = client.session("lstm")
    y = session.step(x)               # seq + request id: exactly-once on retries
    ys = session.run(xs)              # (T, ...) in, (T, ...) out
    session.end()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from rnnserve.client._exceptions import ClientError, StepsLost, from_rpc_error, rolled_back
from rnnserve.client._models import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RETRYABLE,
    ExportedState,
    Inputs,
    ManyResult,
    ModelInfo,
    Outputs,
    RequestIds,
    RetryPolicy,
    SessionInfo,
    Signature,
    auth_metadata,
    channel_credentials,
    channel_options,
    decode_outputs,
    encode_named,
    many_request,
    new_id,
    normalize_addresses,
    sequence_length,
    simplify,
    slice_sequence,
    stack_outputs,
    step_of,
)
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

__all__ = ["Client", "Session"]

#: `(done, total)` after each step of `run`/`stream`.
ProgressCallback = Callable[[int, int], None]


class Client:
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

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        timeout: float | None = 30.0,
        stream_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self.addresses = normalize_addresses(addresses)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry = retry or RetryPolicy()
        self._metadata = auth_metadata(token)
        self._credentials = channel_credentials(tls)
        self._options = channel_options(max_message_bytes)
        self._interceptors = tuple(interceptors)
        self._channels: dict[int, grpc.Channel] = {}
        self._current = 0
        self._signatures: dict[tuple[str, str], Signature] = {}
        self._closed = False

    # -- connection ----------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._current]

    def _stub(self) -> Any:
        if self._closed:
            raise ClientError("the client is closed")
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

    def _failover(self, retry: int, failed: int | None = None) -> None:
        """Move past the address that failed (`failed`: its index; default: the current
        one), then wait the backoff of retry number `retry`. Calls (threads) that failed
        together on one address move on once, instead of rotating back to it."""
        failed = self._current if failed is None else failed
        if self._current == failed:
            self._current = (failed + 1) % len(self.addresses)
        time.sleep(self.retry.backoff_s(retry))

    def _call(self, method: str, request: Any) -> Any:
        """A unary call with retries; the same request message is sent every time."""
        for attempt in range(self.retry.attempts):
            used = self._current
            try:
                return getattr(self._stub(), method)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise from_rpc_error(exc) from exc
            self._failover(attempt, used)
        raise AssertionError("unreachable")

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

    # -- models --------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        reply = self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo(m.name, tuple(m.versions), m.default_version) for m in reply.models]

    def signature(self, model: str, version: str | None = None) -> Signature:
        """The model version's signature (cached per client)."""
        key = (model, version or "")
        if key not in self._signatures:
            reply = self._call(
                "GetModelSignature", pb.GetModelSignatureRequest(model=model, version=version or "")
            )
            signature = Signature.from_message(reply)
            self._signatures[key] = self._signatures[(model, signature.version)] = signature
        return self._signatures[key]

    # -- sessions ------------------------------------------------------------------
    def session(
        self,
        model: str,
        session_id: str | None = None,
        *,
        constants: Inputs | None = None,
        initial_states: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> Session:
        """Start a session (a new id unless given; an existing one is overwritten).

        The id is chosen here when not given, so a retried start is harmless.
        """
        signature = self.signature(model, version)
        request = pb.StartSessionRequest(
            model=model,
            version=signature.version,
            session_id=session_id or new_id(),
            constants=(
                encode_named(signature.constants, constants, role="constant")
                if constants is not None
                else []
            ),
            initial_states=(
                encode_named(signature.states, initial_states, role="state")
                if initial_states is not None
                else []
            ),
        )
        reply = self._call("StartSession", request)
        return Session(self, signature, SessionInfo.from_message(reply.session))

    def attach(self, model: str, session_id: str) -> Session:
        """A handle on an existing session (e.g. started by another process), at its seq."""
        info = self._get_session(model, session_id)
        return Session(self, self.signature(model, info.version), info)

    def import_session(self, model: str, session_id: str, record: bytes | ExportedState) -> Session:
        """Create (or overwrite) `session_id` from an exported record."""
        raw = record.record if isinstance(record, ExportedState) else record
        reply = self._call(
            "ImportState",
            pb.ImportStateRequest(
                session=pb.SessionRef(model=model, session_id=session_id), record=raw
            ),
        )
        info = SessionInfo.from_message(reply)
        return Session(self, self.signature(model, info.version), info)

    def step_many(
        self,
        model: str,
        session_ids: Sequence[str],
        inputs: Inputs,
        *,
        seqs: Iterable[int | None] | None = None,
        request_ids: Sequence[str] | None = None,
        version: str | None = None,
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
        signature = self.signature(model, version)
        request = many_request(signature, session_ids, inputs, seqs=seqs, request_ids=request_ids)
        return ManyResult.from_message(self._call("StepMany", request))

    def _get_session(self, model: str, session_id: str) -> SessionInfo:
        reply = self._call("GetSession", pb.SessionRef(model=model, session_id=session_id))
        return SessionInfo.from_message(reply)


class Session:
    """One server-side session. Not thread-safe: step it from one thread at a time.

    `seq` is the session's step count as this handle last saw it; every step sends
    it, so a step from a stale handle fails with `SeqConflict` instead of applying
    out of order. `info()` re-reads it from the server.
    """

    def __init__(self, client: Client, signature: Signature, info: SessionInfo) -> None:
        self.client = client
        self.signature = signature
        self.model = info.model
        self.session_id = info.session_id
        self.version = info.version
        self.seq = info.seq
        #: True when the last `step` was answered with the stored reply of a retry.
        self.last_replayed = False
        self._ids = RequestIds()
        self._seq_unknown = False

    def __repr__(self) -> str:
        return f"Session({self.model!r}, {self.session_id!r}, version={self.version!r}, seq={self.seq})"

    def _ref(self) -> pb.SessionRef:
        return pb.SessionRef(model=self.model, session_id=self.session_id)

    def _expected_seq(self) -> int:
        if self._seq_unknown:
            self.info()
        return self.seq

    def _step_request(self, x: Inputs, seq: int, request_id: str) -> pb.StepRequest:
        return pb.StepRequest(
            model=self.model,
            session_id=self.session_id,
            inputs=encode_named(self.signature.inputs, x, role="input"),
            seq=seq,
            request_id=request_id,
            version=self.version,
        )

    def _send_step(self, request: pb.StepRequest) -> dict[str, Any]:
        reply = self.client._call("Step", request)
        self.seq = int(reply.seq)
        self.last_replayed = bool(reply.replayed)
        return decode_outputs(reply.outputs)

    def step(self, x: Inputs) -> Outputs:
        """One timestep: an array (one-input models) or arrays by input name."""
        request = self._step_request(x, self._expected_seq(), self._ids.next())
        return simplify(self._send_step(request))

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
        specs = self.signature.inputs
        total = sequence_length(specs, xs)
        base = self._expected_seq()
        request_id = self._ids.next()
        acked = 0
        failures = 0
        self._seq_unknown = True  # until the whole sequence is acknowledged
        while acked < total:
            start = acked
            call: Any = None
            try:
                call = self.client._stub().RunSequenceStream(
                    pb.RunSequenceRequest(
                        model=self.model,
                        session_id=self.session_id,
                        inputs=encode_named(specs, slice_sequence(specs, xs, start), role="input"),
                        seq=base + start,
                        request_id=f"{request_id}@{start}",
                        version=self.version,
                    ),
                    timeout=self.client.stream_timeout,
                    metadata=self.client._metadata,
                )
                for reply in call:
                    self.seq = int(reply.seq)
                    acked += 1
                    failures = 0
                    if on_step is not None:
                        on_step(acked, total)
                    yield decode_outputs(reply.outputs)
                continue
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or failures == self.client.retry.attempts - 1:
                    raise from_rpc_error(exc) from exc
            finally:
                if call is not None and acked < total:
                    call.cancel()
            self.client._failover(failures)
            failures += 1
            applied = self.info().seq - base
            self._seq_unknown = True
            if applied == acked + 1:
                # Step `acked` was applied but its reply lost: fetch it as a replay.
                step_id = f"{request_id}@{start}#{acked - start}"
                replay = self._step_request(step_of(specs, xs, acked), base + acked, step_id)
                outputs = self._send_step(replay)
                acked += 1
                if on_step is not None:
                    on_step(acked, total)
                yield outputs
            elif applied < acked:  # the store lost steps it acknowledged
                raise rolled_back(
                    self.session_id, stored_seq=base + applied, requested_seq=base + acked
                )
            elif applied != acked:
                raise StepsLost(
                    f"session {self.session_id!r}: the server applied {applied} step(s) of "
                    f"this sequence but only {acked} repl(ies) arrived",
                    acknowledged=acked,
                    current_seq=base + applied,
                )
        self._seq_unknown = False

    def info(self) -> SessionInfo:
        """The session as the server has it now (also updates `seq`)."""
        info = self.client._get_session(self.model, self.session_id)
        self.seq = info.seq
        self._seq_unknown = False
        return info

    def reset(
        self, *, constants: Inputs | None = None, initial_states: Mapping[str, Any] | None = None
    ) -> SessionInfo:
        """Back to seq 0 and initial states (constants kept unless given)."""
        request = pb.ResetSessionRequest(
            session=self._ref(),
            constants=(
                encode_named(self.signature.constants, constants, role="constant")
                if constants is not None
                else []
            ),
            initial_states=(
                encode_named(self.signature.states, initial_states, role="state")
                if initial_states is not None
                else []
            ),
        )
        info = SessionInfo.from_message(self.client._call("ResetSession", request))
        self.seq = info.seq
        self._seq_unknown = False
        return info

    def end(self) -> bool:
        """Delete the session on the server; False if it was already gone."""
        return bool(self.client._call("EndSession", self._ref()).existed)

    def export(self) -> ExportedState:
        """The session's record (portable bytes) plus its states and constants."""
        exported = ExportedState.from_message(self.client._call("ExportState", self._ref()))
        self.seq = exported.info.seq
        return exported

    def import_(self, record: bytes | ExportedState) -> SessionInfo:
        """Replace this session with an exported record (its seq comes along)."""
        raw = record.record if isinstance(record, ExportedState) else record
        reply = self.client._call(
            "ImportState", pb.ImportStateRequest(session=self._ref(), record=raw)
        )
        info = SessionInfo.from_message(reply)
        self.seq = info.seq
        self._seq_unknown = False
        return info

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
