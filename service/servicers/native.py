"""`rnnserve.v1.Recurrent`: decode the request, call the engine, encode the reply.

No model or state logic lives here: names, shapes, dtypes, seq and sessions are
the engine's business; errors become statuses in `grpc_status.py`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.call_context import namespace_var
from rnnserve.service.engine import ManyResult, ManySteps, SessionEngine, SessionInfo, StepResult
from rnnserve.service.errors import InvalidArgument
from rnnserve.service.grpc_status import describe, error_detail, error_status
from rnnserve.service.interceptor import stream_reader
from rnnserve.service.record import SessionRecord
from rnnserve.service.servicers._streams import serve_submitted
from rnnserve.service.wire import decode_named, encode_named, encode_tensor, spec_message

# Steps of one StepStream being processed at once (back-pressure on the client).
STREAM_WINDOW = 256
# Messages of one StepManyStream being processed at once (each holds many rows).
MANY_STREAM_WINDOW = 64


def _session_info(info: SessionInfo) -> pb.SessionInfo:
    message = pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        seq=info.seq,
        created_unix=info.created_at,
        updated_unix=info.updated_at,
    )
    if info.expires_in_s is not None:
        message.expires_in_seconds = info.expires_in_s
    return message


def _optional_seq(request: Any) -> int | None:
    return request.seq if request.HasField("seq") else None


class RecurrentServicer(pb_grpc.RecurrentServicer):  # type: ignore[misc]
    def __init__(self, engine: SessionEngine) -> None:
        self.engine = engine

    @staticmethod
    def _outputs(result: StepResult) -> list[pb.Tensor]:
        return encode_named(result.output_specs, result.outputs)

    def _submit(self, request: pb.StepRequest) -> asyncio.Future[StepResult]:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        return self.engine.submit_step(
            request.model,
            request.session_id,
            decode_named(request.inputs, role="input"),
            seq=_optional_seq(request),
            request_id=request.request_id or None,
            version=request.version or None,
            namespace=namespace_var.get(),
        )

    def _reply(self, request: pb.StepRequest, result: StepResult) -> pb.StepResponse:
        return pb.StepResponse(
            session_id=request.session_id,
            seq=result.seq,
            outputs=self._outputs(result),
            replayed=result.replayed,
            request_id=request.request_id,
        )

    async def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        return self._reply(request, await self._submit(request))

    # -- sessions ------------------------------------------------------------------
    async def StartSession(
        self, request: pb.StartSessionRequest, context: aio.ServicerContext
    ) -> pb.StartSessionResponse:
        session_id = request.session_id or secrets.token_urlsafe(16)
        info = await self.engine.start(
            request.model,
            session_id,
            version=request.version or None,
            constants=decode_named(request.constants, role="constant"),
            initial_states=(
                decode_named(request.initial_states, role="state")
                if request.initial_states
                else None
            ),
            namespace=namespace_var.get(),
        )
        return pb.StartSessionResponse(session=_session_info(info))

    async def Step(self, request: pb.StepRequest, context: aio.ServicerContext) -> pb.StepResponse:
        return await self._step(request)

    async def StepStream(
        self, requests: AsyncIterator[pb.StepRequest], context: aio.ServicerContext
    ) -> None:
        # One future per step, no task per message, and reads and writes straight on the
        # context (no async generators in between): a stream carries many sessions'
        # steps, and its per-message cost is most of what a streamed step costs.
        def failed(request: pb.StepRequest, exc: BaseException) -> pb.StepResponse:
            return pb.StepResponse(  # one bad step must not end the stream
                session_id=request.session_id,
                request_id=request.request_id,
                error=error_status(exc),
            )

        def submit(request: pb.StepRequest) -> pb.StepResponse | asyncio.Future[StepResult]:
            try:
                return self._submit(request)
            except Exception as exc:
                return failed(request, exc)

        def finish(request: pb.StepRequest, future: asyncio.Future[StepResult]) -> pb.StepResponse:
            try:
                return self._reply(request, future.result())
            except (Exception, asyncio.CancelledError) as exc:  # cancelled: the stream closes
                return failed(request, exc)

        await serve_submitted(
            stream_reader(context), context.write, submit, finish, window=STREAM_WINDOW
        )

    # -- many sessions per message -------------------------------------------------
    def _submit_many(self, request: pb.StepManyRequest) -> ManySteps:
        return self.engine.submit_many(
            request.model,
            request.session_ids,
            decode_named(request.inputs, role="input"),
            seqs=[None if s < 0 else s for s in request.seqs] or None,
            request_ids=list(request.request_ids) or None,
            version=request.version or None,
            namespace=namespace_var.get(),
        )

    @staticmethod
    def _many_reply(request: pb.StepManyRequest, result: ManyResult) -> pb.StepManyResponse:
        codes = [0] * len(result.errors)
        messages = [""] * len(result.errors)
        details: list[pb.ErrorDetail] = []  # only when a row failed: the fast path pays nothing
        for k, error in enumerate(result.errors):
            if error is not None:
                code, messages[k] = describe(error)
                codes[k] = code.value[0]
                if not details:
                    details = [pb.ErrorDetail() for _ in result.errors]
                details[k].CopyFrom(error_detail(error))
        return pb.StepManyResponse(
            batch_id=request.batch_id,
            session_ids=request.session_ids,
            codes=codes,
            messages=messages,
            details=details,
            seqs=result.seqs,
            replayed=result.replayed,
            outputs=encode_named(result.output_specs, result.outputs),
        )

    async def StepMany(
        self, request: pb.StepManyRequest, context: aio.ServicerContext
    ) -> pb.StepManyResponse:
        pending = self._submit_many(request)
        await pending.done
        return self._many_reply(request, pending.result())

    async def StepManyStream(
        self, requests: AsyncIterator[pb.StepManyRequest], context: aio.ServicerContext
    ) -> None:
        pendings: dict[asyncio.Future[None], ManySteps] = {}

        def failed(request: pb.StepManyRequest, exc: BaseException) -> pb.StepManyResponse:
            return pb.StepManyResponse(  # one refused message must not end the stream
                batch_id=request.batch_id, error=error_status(exc)
            )

        def submit(
            request: pb.StepManyRequest,
        ) -> pb.StepManyResponse | asyncio.Future[None]:
            try:
                pending = self._submit_many(request)
            except Exception as exc:
                return failed(request, exc)
            pendings[pending.done] = pending
            return pending.done

        def finish(
            request: pb.StepManyRequest, future: asyncio.Future[None]
        ) -> pb.StepManyResponse:
            pending = pendings.pop(future)
            try:
                return self._many_reply(request, pending.result())
            except Exception as exc:
                return failed(request, exc)

        await serve_submitted(
            stream_reader(context), context.write, submit, finish, window=MANY_STREAM_WINDOW
        )

    async def RunSequence(
        self, request: pb.RunSequenceRequest, context: aio.ServicerContext
    ) -> pb.RunSequenceResponse:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        result = await self.engine.run_sequence(
            request.model,
            request.session_id,
            decode_named(request.inputs, role="input"),
            seq=_optional_seq(request),
            request_id=request.request_id or None,
            version=request.version or None,
            namespace=namespace_var.get(),
        )
        return pb.RunSequenceResponse(
            session_id=request.session_id,
            seq=result.seq,
            outputs=encode_named(result.output_specs, result.outputs),
        )

    async def RunSequenceStream(
        self, request: pb.RunSequenceRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        if not request.session_id:
            raise InvalidArgument("session_id is required")
        arrays = decode_named(request.inputs, role="input")
        async for t, result in self.engine.iter_sequence(
            request.model,
            request.session_id,
            arrays,
            seq=_optional_seq(request),
            request_id=request.request_id or None,
            version=request.version or None,
            namespace=namespace_var.get(),
        ):
            yield pb.StepResponse(
                session_id=request.session_id,
                seq=result.seq,
                outputs=self._outputs(result),
                replayed=result.replayed,
                request_id=f"{request.request_id}#{t}" if request.request_id else "",
            )

    async def EndSession(
        self, request: pb.SessionRef, context: aio.ServicerContext
    ) -> pb.EndSessionResponse:
        existed = await self.engine.end(
            request.model, request.session_id, namespace=namespace_var.get()
        )
        return pb.EndSessionResponse(existed=existed)

    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        info = await self.engine.reset(
            request.session.model,
            request.session.session_id,
            constants=decode_named(request.constants, role="constant")
            if request.constants
            else None,
            initial_states=(
                decode_named(request.initial_states, role="state")
                if request.initial_states
                else None
            ),
            namespace=namespace_var.get(),
        )
        return _session_info(info)

    async def GetSession(
        self, request: pb.SessionRef, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        info = await self.engine.get(
            request.model, request.session_id, namespace=namespace_var.get()
        )
        return _session_info(info)

    async def ExportState(
        self, request: pb.SessionRef, context: aio.ServicerContext
    ) -> pb.ExportStateResponse:
        record = await self.engine.export_state(
            request.model, request.session_id, namespace=namespace_var.get()
        )
        signature = self.engine.loaded(record.model, record.version).signature
        info = await self.engine.get(
            request.model, request.session_id, namespace=namespace_var.get()
        )
        return pb.ExportStateResponse(
            session=_session_info(info),
            record=record.encode(),
            states=[
                encode_tensor(spec.name, value)
                for spec, value in zip(signature.states, record.states, strict=True)
            ],
            constants=[
                encode_tensor(spec.name, value)
                for spec, value in zip(signature.constants, record.constants, strict=True)
            ],
        )

    async def ImportState(
        self, request: pb.ImportStateRequest, context: aio.ServicerContext
    ) -> pb.SessionInfo:
        try:
            record = SessionRecord.decode(request.record)
        except Exception as exc:  # the bytes come from the client: their fault, not ours
            raise InvalidArgument(f"record is not an rnnserve session record: {exc}") from exc
        info = await self.engine.import_state(
            request.session.model,
            request.session.session_id,
            record,
            namespace=namespace_var.get(),
        )
        return _session_info(info)

    # -- models --------------------------------------------------------------------
    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        engine = self.engine
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=name,
                    versions=engine.versions(name),
                    default_version=engine.default_version(name),
                )
                for name in engine.models()
            ]
        )

    async def GetModelSignature(
        self, request: pb.GetModelSignatureRequest, context: aio.ServicerContext
    ) -> pb.ModelSignature:
        loaded = self.engine.loaded(request.model, request.version or None)
        sig = loaded.signature
        return pb.ModelSignature(
            model=loaded.name,
            version=loaded.version,
            inputs=[spec_message(s) for s in sig.inputs],
            constants=[spec_message(s) for s in sig.constants],
            states=[spec_message(s) for s in sig.states],
            outputs=[spec_message(s) for s in sig.outputs],
            max_batch_size=loaded.config.max_batch_size,
            idle_timeout_seconds=loaded.config.idle_timeout_s,
            max_sequence_length=loaded.config.max_sequence_length,
            metadata=loaded.config.metadata,
        )
