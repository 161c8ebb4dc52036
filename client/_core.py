"""The SDK's core without I/O: what the blocking and the asyncio clients share.

In the spirit of httpx's shared base client and h11's state machines, everything here
decides and builds, and nothing sends, waits or sleeps:

- `ClientCore`: the settings, the address calls go to and failover, the tries of a
  unary call (`UnaryAttempts`: retry or raise, and the backoff), the signature cache and
  the request messages of the client's calls.
- `SessionCore`: one session handle's seq, request ids, request messages and how
  replies update it.
- `SequenceRun`: the exactly-once resume of `run`/`stream` as a state machine. The
  transport asks it for the next call, hands it each reply and each failure, and after a
  failure the session's seq as the server has it; the run answers what to do next: go
  on, fetch one lost reply again as a replay, or give up (`StepsLost`, or
  `SessionRolledBack` when the store lost steps it had acknowledged).

`_sync.py` and `_async.py` subclass the two cores and keep only their transport: open a
channel, make the call, wait (`time.sleep` or `asyncio.sleep`), iterate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import grpc

from rnnserve.client._exceptions import (
    ClientError,
    InvalidRequest,
    StepsLost,
    from_rpc_error,
    rolled_back,
)
from rnnserve.client._models import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RETRYABLE,
    ExportedState,
    Inputs,
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
    slice_sequence,
    step_of,
)
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb

__all__ = [
    "ClientCore",
    "ManyOptions",
    "ResetOptions",
    "SequenceRun",
    "SessionCore",
    "StartOptions",
    "UnaryAttempts",
]


class StartOptions(TypedDict, total=False):
    """`session()`'s keyword arguments (both clients).

    `constants`, `initial_states`: one array (a single-tensor role) or arrays by name
    (default: none / the model's initial states); `version`: default the latest loaded.
    """

    constants: Inputs | None
    initial_states: Mapping[str, Any] | None
    version: str | None


class ManyOptions(TypedDict, total=False):
    """The per-row keyword arguments of `step_many()` and `ManyStream.send()`.

    `seqs`: the seq each row advances from (None: that row applies in arrival order);
    `request_ids`: one per row (default: fresh ones).
    """

    seqs: Iterable[int | None] | None
    request_ids: Sequence[str] | None


class ResetOptions(TypedDict, total=False):
    """`reset()`'s keyword arguments: new constants (default: keep) and initial states."""

    constants: Inputs | None
    initial_states: Mapping[str, Any] | None


def _optional_tensors(specs: Sequence[Any], values: Inputs | None, role: str) -> list[pb.Tensor]:
    return [] if values is None else encode_named(specs, values, role=role)


class UnaryAttempts:
    """The tries of one unary call: after each failure, raise or say how long to wait.

    attempts = core.unary_attempts()
    while True:
        used = core.current
        try:
            return send()
        except grpc.RpcError as exc:
            sleep(attempts.failed(exc, used))  # raises the ClientError when final
    """

    def __init__(self, core: ClientCore) -> None:
        self._core = core
        self.attempt = 0

    def failed(self, exc: grpc.RpcError, used: int) -> float:
        """The seconds to wait before the next try (on the next address); raises the
        call's `ClientError` when `exc` is not retryable or this was the last try."""
        if exc.code() not in RETRYABLE or self.attempt >= self._core.retry.attempts - 1:
            raise from_rpc_error(exc) from exc
        backoff = self._core.failover(self.attempt, used)
        self.attempt += 1
        return backoff


class ClientCore:
    """What `Client` and `AsyncClient` share (see `Client` for the arguments)."""

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
        self._channels: dict[int, Any] = {}  # by address index, opened by the transport
        self._current = 0
        self._signatures: dict[tuple[str, str], Signature] = {}
        self._defaults: dict[str, Signature] = {}  # model -> its default version's, last seen
        self._closed = False

    # -- addresses ------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._current]

    @property
    def current(self) -> int:
        """The index (in `addresses`) of the address calls go to now."""
        return self._current

    def failover(self, retry: int, failed: int | None = None) -> float:
        """Move past the address that failed (`failed`: its index; default: the current
        one); returns the backoff (seconds) of retry number `retry`. Calls that failed
        together on one address move on once: each rotating the shared index would send
        half of them back to the address that failed."""
        failed = self._current if failed is None else failed
        if self._current == failed:
            self._current = (failed + 1) % len(self.addresses)
        return self.retry.backoff_s(retry)

    def unary_attempts(self) -> UnaryAttempts:
        return UnaryAttempts(self)

    def check_open(self) -> None:
        if self._closed:
            raise ClientError("the client is closed")

    # -- signatures -----------------------------------------------------------------
    def cached_signature(
        self, model: str, version: str | None, *, default_cached: bool = False
    ) -> Signature | None:
        """The signature of a named version if it was fetched before. The default
        version (None) is answered from the cache only with `default_cached` (the rows of
        `step_many` belong to sessions that already exist): a new session asks each time,
        so a long-lived client follows the server's default as versions come and go."""
        if version:
            return self._signatures.get((model, version))
        return self._defaults.get(model) if default_cached else None

    def signature_request(self, model: str, version: str | None) -> pb.GetModelSignatureRequest:
        return pb.GetModelSignatureRequest(model=model, version=version or "")

    def remember_signature(self, reply: pb.ModelSignature, *, asked: str | None) -> Signature:
        """The signature of a GetModelSignature reply for version `asked` (None: the
        default), cached under its named version (and as the default last seen)."""
        signature = Signature.from_message(reply)
        self._signatures[(signature.model, signature.version)] = signature
        if not asked:
            self._defaults[signature.model] = signature
        return signature

    # -- requests -------------------------------------------------------------------
    @staticmethod
    def start_request(
        signature: Signature, session_id: str | None, options: StartOptions
    ) -> pb.StartSessionRequest:
        """The id is chosen here when not given, so a retried start is harmless."""
        return pb.StartSessionRequest(
            model=signature.model,
            version=signature.version,
            session_id=session_id or new_id(),
            constants=_optional_tensors(signature.constants, options.get("constants"), "constant"),
            initial_states=_optional_tensors(
                signature.states, options.get("initial_states"), "state"
            ),
        )

    @staticmethod
    def import_request(
        model: str, session_id: str, record: bytes | ExportedState
    ) -> pb.ImportStateRequest:
        raw = record.record if isinstance(record, ExportedState) else record
        return pb.ImportStateRequest(
            session=pb.SessionRef(model=model, session_id=session_id), record=raw
        )

    @staticmethod
    def many_request(
        signature: Signature,
        session_ids: Sequence[str],
        inputs: Inputs,
        options: ManyOptions,
        batch_id: str = "",
    ) -> pb.StepManyRequest:
        return many_request(
            signature,
            session_ids,
            inputs,
            seqs=options.get("seqs"),
            request_ids=options.get("request_ids"),
            batch_id=batch_id,
        )


class SessionCore:
    """What `Session` and `AsyncSession` share: the handle's view of its session.

    `seq` is the session's step count as this handle last saw it; every step sends it,
    so a step from a stale handle fails with `SeqConflict` instead of applying out of
    order. `seq_unknown` is True while a sequence call is under way or broke: the next
    call re-reads the seq first.
    """

    def __init__(self, signature: Signature, info: SessionInfo) -> None:
        self.signature = signature
        self.model = info.model
        self.session_id = info.session_id
        self.version = info.version
        self.seq = info.seq
        #: True when the last `step` was answered with the stored reply of a retry.
        self.last_replayed = False
        self.seq_unknown = False
        self._ids = RequestIds()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.model!r}, {self.session_id!r}, "
            f"version={self.version!r}, seq={self.seq})"
        )

    def ref(self) -> pb.SessionRef:
        return pb.SessionRef(model=self.model, session_id=self.session_id)

    def step_request(
        self, x: Inputs, seq: int | None = None, request_id: str | None = None
    ) -> pb.StepRequest:
        """A step from `seq` (default: the handle's) with a new request id (or `request_id`)."""
        return pb.StepRequest(
            model=self.model,
            session_id=self.session_id,
            inputs=encode_named(self.signature.inputs, x, role="input"),
            seq=self.seq if seq is None else seq,
            request_id=self._ids.next() if request_id is None else request_id,
            version=self.version,
        )

    def step_done(self, reply: pb.StepResponse) -> dict[str, Any]:
        """The outputs of a Step reply; the handle moves to its seq."""
        self.seq = int(reply.seq)
        self.last_replayed = bool(reply.replayed)
        return decode_outputs(reply.outputs)

    def reset_request(self, options: ResetOptions) -> pb.ResetSessionRequest:
        return pb.ResetSessionRequest(
            session=self.ref(),
            constants=_optional_tensors(
                self.signature.constants, options.get("constants"), "constant"
            ),
            initial_states=_optional_tensors(
                self.signature.states, options.get("initial_states"), "state"
            ),
        )

    def import_request(self, record: bytes | ExportedState) -> pb.ImportStateRequest:
        return ClientCore.import_request(self.model, self.session_id, record)

    def synced(self, info: SessionInfo) -> SessionInfo:
        """The server says the session is at `info.seq`: the handle is there too."""
        self.seq = info.seq
        self.seq_unknown = False
        return info

    def sequence(self, xs: Inputs, attempts: int) -> SequenceRun:
        """The state machine of one `run`/`stream` of `xs` from the handle's seq (call
        it after re-reading the seq if `seq_unknown`)."""
        return SequenceRun(self, xs, attempts)


class SequenceRun:
    """The exactly-once resume of one sequence call (`run` / `stream`), without I/O.

    A transport drives it so:

        run = session.sequence(xs, attempts)
        while (request := run.next_call()) is not None:
            try:
                for reply in send(request):       # RunSequenceStream
                    yield run.reply(reply)
            except grpc.RpcError as exc:
                sleep(run.failed(exc))            # raises when final
                replay = run.resync(get_session()) # raises StepsLost
                if replay is not None:
                    yield run.replayed(send_step(replay))

    Every call after the first starts after the last acknowledged step, with that
    step's seq and a request id of its own, so a step is never applied twice. After a
    break the server may have applied one step more than the client saw (its reply was
    lost): that step is fetched again as a replay of its stored reply (a Step with its
    seq and request id). More than one such step cannot be recovered: only a session's
    last reply is kept (`StepsLost`).
    """

    def __init__(self, session: SessionCore, xs: Inputs, attempts: int) -> None:
        specs = session.signature.inputs
        self.total = sequence_length(specs, xs)
        if self.total == 0:
            raise InvalidRequest("an empty sequence: give at least one step (T >= 1)")
        self._session = session
        self._xs = xs
        self._attempts = attempts
        self.base = session.seq
        self.request_id = session._ids.next()
        #: Steps whose outputs were handed back (in order).
        self.acked = 0
        #: Failures since the last reply (the retry number of the next backoff).
        self.failures = 0
        self._start = 0
        session.seq_unknown = True  # until the whole sequence is acknowledged

    @property
    def done(self) -> bool:
        return self.acked >= self.total

    def next_call(self) -> pb.RunSequenceRequest | None:
        """The RunSequenceStream request for the steps not acknowledged yet (None: done)."""
        if self.done:
            self._session.seq_unknown = False
            return None
        specs = self._session.signature.inputs
        self._start = self.acked
        return pb.RunSequenceRequest(
            model=self._session.model,
            session_id=self._session.session_id,
            inputs=encode_named(specs, slice_sequence(specs, self._xs, self.acked), role="input"),
            seq=self.base + self.acked,
            request_id=f"{self.request_id}@{self.acked}",
            version=self._session.version,
        )

    def reply(self, reply: pb.RunSequenceResponse) -> dict[str, Any]:
        """One step's reply arrived: its outputs."""
        self._session.seq = int(reply.seq)
        self.acked += 1
        self.failures = 0
        return decode_outputs(reply.outputs)

    def failed(self, exc: grpc.RpcError) -> int:
        """The call broke: the retry number whose backoff to wait (then fail over and
        `resync`); raises the `ClientError` when `exc` is not retryable or the retries
        are spent."""
        if exc.code() not in RETRYABLE or self.failures >= self._attempts - 1:
            raise from_rpc_error(exc) from exc
        self.failures += 1
        return self.failures - 1

    def resync(self, info: SessionInfo) -> pb.StepRequest | None:
        """After a failure, the session as the server has it: None to go on with
        `next_call`, or the Step to send to fetch one lost reply again (its reply goes to
        `replayed`). Raises `StepsLost` if more than one reply was lost, and
        `SessionRolledBack` if the session is behind steps already acknowledged."""
        self._session.seq = info.seq
        self._session.seq_unknown = True
        applied = info.seq - self.base
        if applied == self.acked:
            return None
        if applied == self.acked + 1:
            specs = self._session.signature.inputs
            step_id = f"{self.request_id}@{self._start}#{self.acked - self._start}"
            return self._session.step_request(
                step_of(specs, self._xs, self.acked), self.base + self.acked, step_id
            )
        if applied < self.acked:  # the store lost steps it acknowledged
            raise rolled_back(
                self._session.session_id,
                stored_seq=self.base + applied,
                requested_seq=self.base + self.acked,
            )
        raise StepsLost(
            f"session {self._session.session_id!r}: the server applied {applied} step(s) of "
            f"this sequence but only {self.acked} repl(ies) arrived",
            acknowledged=self.acked,
            current_seq=self.base + applied,
        )

    def replayed(self, reply: pb.StepResponse) -> dict[str, Any]:
        """The reply of the Step that `resync` asked for: the lost step's outputs."""
        outputs = self._session.step_done(reply)
        self.acked += 1
        return outputs
