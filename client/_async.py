"""The asyncio client (grpc.aio): `AsyncClient` and its `AsyncSession` handles.

    async with AsyncClient(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
        session = await client.session("lstm")
        y = await session.step(x)
        async for y in session.stream(xs):
            ...
        await session.end()

The same behaviour as the blocking `Client` (`_sync.py`), awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from grpc import aio

from rnnserve.client._exceptions import (
    ClientError,
    ConnectionFailed,
    StepsLost,
    from_error_message,
    from_rpc_error,
    rolled_back,
)
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
from rnnserve.client._sync import ProgressCallback
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncSession", "ManyStream"]


class AsyncClient:
    """The asyncio twin of `Client`: same arguments, same retries and failover."""

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
        self._channels: dict[int, aio.Channel] = {}
        self._current = 0
        self._signatures: dict[tuple[str, str], Signature] = {}
        self._closed = False

    # -- connection ----------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.addresses[self._current]

    def _stub(self) -> Any:
        if self._closed:
            raise ClientError("the client is closed")
        channel = self._channels.get(self._current)
        if channel is None:
            if self._credentials is None:
                channel = aio.insecure_channel(
                    self.address, options=self._options, interceptors=self._interceptors or None
                )
            else:
                channel = aio.secure_channel(
                    self.address,
                    self._credentials,
                    self._options,
                    interceptors=self._interceptors or None,
                )
            self._channels[self._current] = channel
        return pb_grpc.RecurrentStub(channel)  # type: ignore[no-untyped-call]

    async def _failover(self, retry: int, failed: int | None = None) -> None:
        """Move past the address that failed (`failed`: its index; default: the current
        one), then wait the backoff of retry number `retry`. Calls that failed together
        on one address move on once: each rotating the shared index would send half of
        them back to the address that failed."""
        failed = self._current if failed is None else failed
        if self._current == failed:
            self._current = (failed + 1) % len(self.addresses)
        await asyncio.sleep(self.retry.backoff_s(retry))

    async def _call(self, method: str, request: Any) -> Any:
        for attempt in range(self.retry.attempts):
            used = self._current
            try:
                return await getattr(self._stub(), method)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise from_rpc_error(exc) from exc
            await self._failover(attempt, used)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- models --------------------------------------------------------------------
    async def list_models(self) -> list[ModelInfo]:
        reply = await self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo(m.name, tuple(m.versions), m.default_version) for m in reply.models]

    async def signature(self, model: str, version: str | None = None) -> Signature:
        key = (model, version or "")
        if key not in self._signatures:
            reply = await self._call(
                "GetModelSignature", pb.GetModelSignatureRequest(model=model, version=version or "")
            )
            signature = Signature.from_message(reply)
            self._signatures[key] = self._signatures[(model, signature.version)] = signature
        return self._signatures[key]

    # -- sessions ------------------------------------------------------------------
    async def session(
        self,
        model: str,
        session_id: str | None = None,
        *,
        constants: Inputs | None = None,
        initial_states: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> AsyncSession:
        """Start a session (see `Client.session`)."""
        signature = await self.signature(model, version)
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
        reply = await self._call("StartSession", request)
        return AsyncSession(self, signature, SessionInfo.from_message(reply.session))

    async def attach(self, model: str, session_id: str) -> AsyncSession:
        info = await self._get_session(model, session_id)
        return AsyncSession(self, await self.signature(model, info.version), info)

    async def import_session(
        self, model: str, session_id: str, record: bytes | ExportedState
    ) -> AsyncSession:
        raw = record.record if isinstance(record, ExportedState) else record
        reply = await self._call(
            "ImportState",
            pb.ImportStateRequest(
                session=pb.SessionRef(model=model, session_id=session_id), record=raw
            ),
        )
        info = SessionInfo.from_message(reply)
        return AsyncSession(self, await self.signature(model, info.version), info)

    async def step_many(
        self,
        model: str,
        session_ids: Sequence[str],
        inputs: Inputs,
        *,
        seqs: Iterable[int | None] | None = None,
        request_ids: Sequence[str] | None = None,
        version: str | None = None,
    ) -> ManyResult:
        """The next step of each of K sessions in one `StepMany` (see `Client.step_many`)."""
        signature = await self.signature(model, version)
        request = many_request(signature, session_ids, inputs, seqs=seqs, request_ids=request_ids)
        return ManyResult.from_message(await self._call("StepMany", request))

    def step_many_stream(self, model: str, *, version: str | None = None) -> ManyStream:
        """One `StepManyStream` call for `step_many` messages, as an async context manager:

            async with client.step_many_stream("lstm") as stream:
                result = await stream.send(session_ids, xs)

        `send` may be awaited by many tasks at once: their messages are pipelined on the
        one stream and each gets its own reply.
        """
        return ManyStream(self, model, version)

    async def _get_session(self, model: str, session_id: str) -> SessionInfo:
        reply = await self._call("GetSession", pb.SessionRef(model=model, session_id=session_id))
        return SessionInfo.from_message(reply)


class AsyncSession:
    """One server-side session (see `Session`); await one call at a time per handle."""

    def __init__(self, client: AsyncClient, signature: Signature, info: SessionInfo) -> None:
        self.client = client
        self.signature = signature
        self.model = info.model
        self.session_id = info.session_id
        self.version = info.version
        self.seq = info.seq
        self.last_replayed = False
        self._ids = RequestIds()
        self._seq_unknown = False

    def __repr__(self) -> str:
        return (
            f"AsyncSession({self.model!r}, {self.session_id!r}, "
            f"version={self.version!r}, seq={self.seq})"
        )

    def _ref(self) -> pb.SessionRef:
        return pb.SessionRef(model=self.model, session_id=self.session_id)

    async def _expected_seq(self) -> int:
        if self._seq_unknown:
            await self.info()
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

    async def _send_step(self, request: pb.StepRequest) -> dict[str, Any]:
        reply = await self.client._call("Step", request)
        self.seq = int(reply.seq)
        self.last_replayed = bool(reply.replayed)
        return decode_outputs(reply.outputs)

    async def step(self, x: Inputs) -> Outputs:
        request = self._step_request(x, await self._expected_seq(), self._ids.next())
        return simplify(await self._send_step(request))

    async def stream(
        self, xs: Inputs, *, on_step: ProgressCallback | None = None
    ) -> AsyncIterator[Outputs]:
        """Each step's outputs as it is applied; resumes like `Session.stream`."""
        async for outputs in self._iter_sequence(xs, on_step):
            yield simplify(outputs)

    async def run(self, xs: Inputs, *, on_step: ProgressCallback | None = None) -> Outputs:
        steps = [outputs async for outputs in self._iter_sequence(xs, on_step)]
        return stack_outputs(steps, self.signature.outputs)

    async def _iter_sequence(
        self, xs: Inputs, on_step: ProgressCallback | None
    ) -> AsyncIterator[dict[str, Any]]:
        specs = self.signature.inputs
        total = sequence_length(specs, xs)
        base = await self._expected_seq()
        request_id = self._ids.next()
        acked = 0
        failures = 0
        self._seq_unknown = True
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
                async for reply in call:
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
            await self.client._failover(failures)
            failures += 1
            applied = (await self.info()).seq - base
            self._seq_unknown = True
            if applied == acked + 1:
                step_id = f"{request_id}@{start}#{acked - start}"
                replay = self._step_request(step_of(specs, xs, acked), base + acked, step_id)
                outputs = await self._send_step(replay)
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

    async def info(self) -> SessionInfo:
        info = await self.client._get_session(self.model, self.session_id)
        self.seq = info.seq
        self._seq_unknown = False
        return info

    async def reset(
        self, *, constants: Inputs | None = None, initial_states: Mapping[str, Any] | None = None
    ) -> SessionInfo:
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
        info = SessionInfo.from_message(await self.client._call("ResetSession", request))
        self.seq = info.seq
        self._seq_unknown = False
        return info

    async def end(self) -> bool:
        return bool((await self.client._call("EndSession", self._ref())).existed)

    async def export(self) -> ExportedState:
        exported = ExportedState.from_message(await self.client._call("ExportState", self._ref()))
        self.seq = exported.info.seq
        return exported

    async def import_(self, record: bytes | ExportedState) -> SessionInfo:
        raw = record.record if isinstance(record, ExportedState) else record
        reply = await self.client._call(
            "ImportState", pb.ImportStateRequest(session=self._ref(), record=raw)
        )
        info = SessionInfo.from_message(reply)
        self.seq = info.seq
        self._seq_unknown = False
        return info

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.end()


class ManyStream:
    """`step_many` messages pipelined over one `StepManyStream` call.

    Open it with `async with client.step_many_stream(model)`; leaving the block ends
    the stream after the replies of the messages sent. Each `send` is one message;
    concurrent sends are written in the order they were called, and their rows apply
    in that order. A message the server refuses as a whole raises its error from its
    `send` and the stream goes on. The stream is not retried: when it breaks, every
    send waiting for a reply raises (`ConnectionFailed` for UNAVAILABLE); resend those
    messages with the same seqs and request ids (e.g. with `step_many`) to have each
    row applied once.
    """

    def __init__(self, client: AsyncClient, model: str, version: str | None) -> None:
        self.client = client
        self.model = model
        self.version = version
        self._signature: Signature | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        # Sends waiting for their reply, by batch id (None: the stream ended first).
        self._waiting: dict[str, asyncio.Future[pb.StepManyResponse | None]] = {}
        self._batches = 0
        self._closing = False
        self._ended: ClientError | None = None

    async def __aenter__(self) -> Self:
        self._signature = await self.client.signature(self.model, self.version)
        self._call = self.client._stub().StepManyStream(
            timeout=self.client.stream_timeout, metadata=self.client._metadata
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send(
        self,
        session_ids: Sequence[str],
        inputs: Inputs,
        *,
        seqs: Iterable[int | None] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> ManyResult:
        """One message of K rows (see `Client.step_many`); its reply when it comes."""
        if self._signature is None:
            raise ClientError("the stream is not open: use `async with`")
        if self._ended is not None:
            raise self._ended
        self._batches += 1
        batch_id = str(self._batches)
        request = many_request(
            self._signature,
            session_ids,
            inputs,
            seqs=seqs,
            request_ids=request_ids,
            batch_id=batch_id,
        )
        reply: asyncio.Future[pb.StepManyResponse | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[batch_id] = reply
        try:
            try:
                async with self._writing:
                    await self._call.write(request)
            except asyncio.InvalidStateError:
                pass  # the call is over: the reader settles `reply`
            message = await reply
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            self._waiting.pop(batch_id, None)
        if message is None:  # the stream ended first
            raise self._ended or ClientError("the stream is closed")
        if message.HasField("error"):
            raise from_error_message(message.error)
        return ManyResult.from_message(message)

    async def _read(self) -> None:
        """Hands each reply to the send waiting for its batch id; when the stream ends,
        says why (`_ended`) and wakes the sends still waiting."""
        error = ClientError("the stream is closed")
        try:
            while (message := await self._call.read()) is not aio.EOF:
                waiting = self._waiting.pop(message.batch_id, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
            if not self._closing:
                error = ConnectionFailed(
                    "the server ended the StepManyStream", code=grpc.StatusCode.UNAVAILABLE
                )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            error.__cause__ = exc
        finally:
            self._ended = error
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_result(None)

    async def aclose(self) -> None:
        """Half-close the stream, wait for the replies still due, then end the call."""
        if self._call is None or self._reader is None:
            return
        self._closing = True
        try:
            async with self._writing:
                await self._call.done_writing()
            await self._reader
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        finally:
            self._reader.cancel()
            self._call.cancel()
