"""The asyncio client (grpc.aio): `AsyncClient` and its `AsyncSession` handles (the
transport of `_core.py`).

    async with AsyncClient(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
        session = await client.session("lstm")
        y = await session.step(x)
        async for y in session.stream(xs):
            ...
        await session.end()

The same behaviour as the blocking `Client` (`_sync.py`), awaited: both drive the one
core (`ClientCore`, `SessionCore`, `SequenceRun`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
from grpc import aio

from rnnserve.client._core import (
    ClientCore,
    ManyOptions,
    ResetOptions,
    SessionCore,
    StartOptions,
)
from rnnserve.client._exceptions import (
    ClientError,
    ConnectionFailed,
    from_error_message,
    from_rpc_error,
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
from rnnserve.client._sync import ProgressCallback
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncSession", "ManyStream"]


class AsyncClient(ClientCore):
    """The asyncio twin of `Client`: same arguments, same retries and failover."""

    # -- transport ------------------------------------------------------------------
    def _stub(self) -> Any:
        self.check_open()
        channel = self._channels.get(self._current)
        if channel is None:
            interceptors = self._interceptors or None
            if self._credentials is None:
                channel = aio.insecure_channel(
                    self.address, options=self._options, interceptors=interceptors
                )
            else:
                channel = aio.secure_channel(
                    self.address, self._credentials, self._options, interceptors=interceptors
                )
            self._channels[self._current] = channel
        return pb_grpc.RecurrentStub(channel)  # type: ignore[no-untyped-call]

    async def _call(self, method: str, request: Any) -> Any:
        attempts = self.unary_attempts()
        while True:
            used = self._current
            try:
                return await getattr(self._stub(), method)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.failed(exc, used))

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

    # -- models ---------------------------------------------------------------------
    async def list_models(self) -> list[ModelInfo]:
        reply = await self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo(m.name, tuple(m.versions), m.default_version) for m in reply.models]

    async def signature(self, model: str, version: str | None = None) -> Signature:
        """See `Client.signature`."""
        return await self._signature(model, version)

    async def _signature(
        self, model: str, version: str | None, *, default_cached: bool = False
    ) -> Signature:
        cached = self.cached_signature(model, version, default_cached=default_cached)
        if cached is not None:
            return cached
        reply = await self._call("GetModelSignature", self.signature_request(model, version))
        return self.remember_signature(reply, asked=version)

    # -- sessions -------------------------------------------------------------------
    async def session(
        self, model: str, session_id: str | None = None, **options: Unpack[StartOptions]
    ) -> AsyncSession:
        """Start a session (see `Client.session`)."""
        signature = await self.signature(model, options.get("version"))
        request = self.start_request(signature, session_id, options)
        reply = await self._call("StartSession", request)
        return AsyncSession(self, signature, SessionInfo.from_message(reply.session))

    async def attach(self, model: str, session_id: str) -> AsyncSession:
        info = await self._get_session(model, session_id)
        return AsyncSession(self, await self.signature(model, info.version), info)

    async def import_session(
        self, model: str, session_id: str, record: bytes | ExportedState
    ) -> AsyncSession:
        reply = await self._call("ImportState", self.import_request(model, session_id, record))
        info = SessionInfo.from_message(reply)
        return AsyncSession(self, await self.signature(model, info.version), info)

    async def step_many(
        self,
        model: str,
        session_ids: Sequence[str],
        inputs: Inputs,
        *,
        version: str | None = None,
        **options: Unpack[ManyOptions],
    ) -> ManyResult:
        """The next step of each of K sessions in one `StepMany` (see `Client.step_many`)."""
        signature = await self._signature(model, version, default_cached=True)
        request = self.many_request(signature, session_ids, inputs, options)
        return ManyResult.from_message(await self._call("StepMany", request))

    def step_many_stream(self, model: str, *, version: str | None = None) -> ManyStream:
        """One `StepManyStream` call for `step_many` messages, as an async context manager:

            async with client.step_many_stream("lstm") as stream:
                result = await stream.send(session_ids, xs)

        `send` may be awaited by many tasks at once: their messages are pipelined on the
        one stream and each gets its own reply.
        """
        return ManyStream(self, model, version)

    async def end_session(self, model: str, session_id: str) -> bool:
        """End (delete) a session by id; False if there was none (ending twice is fine)."""
        ref = pb.SessionRef(model=model, session_id=session_id)
        return bool((await self._call("EndSession", ref)).existed)

    async def _get_session(self, model: str, session_id: str) -> SessionInfo:
        reply = await self._call("GetSession", pb.SessionRef(model=model, session_id=session_id))
        return SessionInfo.from_message(reply)


class AsyncSession(SessionCore):
    """One server-side session (see `Session`); await one call at a time per handle."""

    def __init__(self, client: AsyncClient, signature: Signature, info: SessionInfo) -> None:
        super().__init__(signature, info)
        self.client = client

    async def _resynced(self) -> None:
        if self.seq_unknown:
            await self.info()

    async def step(self, x: Inputs) -> Outputs:
        await self._resynced()
        return simplify(self.step_done(await self.client._call("Step", self.step_request(x))))

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
        await self._resynced()
        run = self.sequence(xs, self.client.retry.attempts)
        while (request := run.next_call()) is not None:
            call: Any = None
            try:
                call = self.client._stub().RunSequenceStream(
                    request, timeout=self.client.stream_timeout, metadata=self.client._metadata
                )
                async for reply in call:
                    outputs = run.reply(reply)
                    if on_step is not None:
                        on_step(run.acked, run.total)
                    yield outputs
                continue
            except grpc.RpcError as exc:
                await asyncio.sleep(self.client.failover(run.failed(exc)))
            finally:
                if call is not None and not run.done:
                    call.cancel()
            replay = run.resync(await self.info())
            if replay is not None:
                outputs = run.replayed(await self.client._call("Step", replay))
                if on_step is not None:
                    on_step(run.acked, run.total)
                yield outputs

    async def info(self) -> SessionInfo:
        return self.synced(await self.client._get_session(self.model, self.session_id))

    async def reset(self, **options: Unpack[ResetOptions]) -> SessionInfo:
        request = self.reset_request(options)
        reply = await self.client._call("ResetSession", request)
        return self.synced(SessionInfo.from_message(reply))

    async def end(self) -> bool:
        return bool((await self.client._call("EndSession", self.ref())).existed)

    async def export(self) -> ExportedState:
        exported = ExportedState.from_message(await self.client._call("ExportState", self.ref()))
        self.seq = exported.info.seq
        return exported

    async def import_(self, record: bytes | ExportedState) -> SessionInfo:
        reply = await self.client._call("ImportState", self.import_request(record))
        return self.synced(SessionInfo.from_message(reply))

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
        self._signature = await self.client._signature(
            self.model, self.version, default_cached=True
        )
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
        self, session_ids: Sequence[str], inputs: Inputs, **options: Unpack[ManyOptions]
    ) -> ManyResult:
        """One message of K rows (see `Client.step_many`); its reply when it comes."""
        if self._signature is None:
            raise ClientError("the stream is not open: use `async with`")
        if self._ended is not None:
            raise self._ended
        self._batches += 1
        batch_id = str(self._batches)
        request = self.client.many_request(self._signature, session_ids, inputs, options, batch_id)
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
