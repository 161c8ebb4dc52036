"""KServe v2 `inference.GRPCInferenceService` with Triton's sequence extension.

A Triton sequence is an rnnserve session: `sequence_id` (uint64 or string)
names it, `sequence_start` starts it (constants, if the model has any, come with
that request and only with it), every request is one step of batch size 1, and
`sequence_end` ends it after its step. As in Triton, a request without the START
flag for a sequence the server does not know is INVALID_ARGUMENT; a START for a
sequence that exists restarts it from the initial state. uint64 and string ids
never collide: they map to session ids `u<id>` and `s<id>` (an int64 id is read
as the uint64 of the same bits, as Triton does).

A request's `id` is only echoed back (Triton clients match stream responses by
it); it is not the engine's retry key, since Triton ids need not be unique.

In one `ModelStreamInfer` stream the requests of one sequence take effect in the
order they were sent; requests of different sequences run concurrently.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Callable

from grpc import aio

from rnnserve.protocol.inference import grpc_service_pb2 as pb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.service.call_context import namespace_var
from rnnserve.service.engine import SessionEngine
from rnnserve.service.errors import InvalidArgument, SessionNotFound
from rnnserve.service.grpc_status import describe
from rnnserve.service.servicers._kserve_codec import (
    PLATFORM,
    check_requested_outputs,
    decode_inputs,
    infer_response,
    metadata_tensor,
    model_config,
    parameter,
    session_id_of,
)
from rnnserve.service.servicers._sequence_order import SequenceOrder, Turn
from rnnserve.service.servicers._streams import answer_concurrently

EXTENSIONS = ("sequence", "model_configuration")
STREAM_WINDOW = 256


def rnnserve_version() -> str:
    try:
        return importlib.metadata.version("rnnserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: SessionEngine, *, ready: Callable[[], bool]) -> None:
        self.engine = engine
        self.ready = ready

    # -- health and metadata --------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        versions = self.engine.versions(request.name)
        ready = bool(versions) and (not request.version or request.version in versions)
        return pb.ModelReadyResponse(ready=ready and self.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="rnnserve", version=rnnserve_version(), extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        loaded = self.engine.loaded(request.name, request.version or None)
        sig = loaded.signature
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=self.engine.versions(loaded.name),
            platform=PLATFORM,
            inputs=[metadata_tensor(s) for s in (*sig.inputs, *sig.constants)],
            outputs=[metadata_tensor(s) for s in sig.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(
            config=model_config(self.engine.loaded(request.name, request.version or None))
        )

    # -- inference --------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        order = SequenceOrder()

        async def answer(request: pb.ModelInferRequest, turn: Turn) -> pb.ModelStreamInferResponse:
            try:
                await turn.wait()
                response = await self._infer(request, submitting=turn.submitting)
                return pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:  # an error answers this request; the stream goes on
                _, message = describe(exc)
                return pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            finally:
                turn.finish()

        # `order.turn(request)` runs on arrival: the requests of one sequence take
        # effect in the order they were sent.
        async for reply in answer_concurrently(
            requests, lambda request: answer(request, order.turn(request)), window=STREAM_WINDOW
        ):
            yield reply

    async def _infer(
        self, request: pb.ModelInferRequest, *, submitting: Callable[[], None] | None = None
    ) -> pb.ModelInferResponse:
        model = request.model_name
        # The signature decodes the request; the reply is built from the step's result.
        loaded = self.engine.loaded(model, request.model_version or None)
        sig = loaded.signature
        params = request.parameters
        session_id = session_id_of(params, model)
        start = bool(parameter(params, "sequence_start"))
        end = bool(parameter(params, "sequence_end"))
        inputs, constants = decode_inputs(request, sig, start=start)
        check_requested_outputs(request, sig)
        namespace = namespace_var.get()
        if start:
            # A step the engine would refuse must not leave a new (or reset) sequence
            # behind: check it before the START takes effect.
            self.engine.check_inputs(model, inputs, version=loaded.version)
            await self.engine.start(
                model,
                session_id,
                version=loaded.version,
                constants=constants,
                namespace=namespace,
            )
        try:
            # Triton request ids are labels, not unique: the engine makes its own
            # (passing them would make a repeated id look like a retry of the last step).
            if submitting is not None:
                submitting()
            result = await self.engine.step(
                model, session_id, inputs, version=loaded.version, namespace=namespace
            )
        except SessionNotFound as exc:
            raise InvalidArgument(
                f"inference request for sequence {session_id[1:]} to model {model!r} must "
                "specify the START flag on the first request of the sequence"
            ) from exc
        if end:
            await self.engine.end(model, session_id, namespace=namespace)
        return infer_response(request, result)
