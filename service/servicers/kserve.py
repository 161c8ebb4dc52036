"""KServe v2 `inference.GRPCInferenceService` with Triton's sequence extension.

A Triton sequence is an rnnserve session: `sequence_id` (uint64 or string)
names it, `sequence_start` starts it (constants, if the model has any, come with
that request), every request is one step of batch size 1, and `sequence_end`
ends it after its step. As in Triton, a request without the START flag for a
sequence the server does not know is INVALID_ARGUMENT. uint64 and string ids
never collide: they map to session ids `u<id>` and `s<id>`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np
from grpc import aio

from rnnserve.core import StepSignature, TensorSpec
from rnnserve.service._generated.inference import grpc_service_pb2 as pb
from rnnserve.service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.service._generated.inference import model_config_pb2 as config_pb
from rnnserve.service.engine import SessionEngine
from rnnserve.service.errors import InvalidArgument, SessionNotFound
from rnnserve.service.repository import LoadedModel, ModelCatalog
from rnnserve.service.status import describe, namespace_var

PLATFORM = "rnnserve_keras"
EXTENSIONS = ("sequence", "model_configuration")
STREAM_WINDOW = 256

# numpy dtype name -> (KServe datatype, Triton model_config DataType, contents field)
_DTYPES: Mapping[str, tuple[str, Any, str]] = {
    "bool": ("BOOL", config_pb.TYPE_BOOL, "bool_contents"),
    "uint8": ("UINT8", config_pb.TYPE_UINT8, "uint_contents"),
    "uint16": ("UINT16", config_pb.TYPE_UINT16, "uint_contents"),
    "uint32": ("UINT32", config_pb.TYPE_UINT32, "uint_contents"),
    "uint64": ("UINT64", config_pb.TYPE_UINT64, "uint64_contents"),
    "int8": ("INT8", config_pb.TYPE_INT8, "int_contents"),
    "int16": ("INT16", config_pb.TYPE_INT16, "int_contents"),
    "int32": ("INT32", config_pb.TYPE_INT32, "int_contents"),
    "int64": ("INT64", config_pb.TYPE_INT64, "int64_contents"),
    "float16": ("FP16", config_pb.TYPE_FP16, ""),
    "float32": ("FP32", config_pb.TYPE_FP32, "fp32_contents"),
    "float64": ("FP64", config_pb.TYPE_FP64, "fp64_contents"),
}


def _version() -> str:
    try:
        return importlib.metadata.version("rnnserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _parameter(params: Mapping[str, pb.InferParameter], name: str) -> Any:
    if name not in params:
        return None
    param = params[name]
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def session_id_of(params: Mapping[str, pb.InferParameter], model: str) -> str:
    """`u<id>` for a uint64 (or int64) sequence id, `s<id>` for a string id."""
    if "sequence_id" not in params:
        raise InvalidArgument(
            f"inference request to model {model!r} must specify a non-zero or non-empty "
            "sequence_id: it is a stateful (sequence) model"
        )
    param = params["sequence_id"]
    choice = param.WhichOneof("parameter_choice")
    if choice in ("uint64_param", "int64_param"):
        value = int(getattr(param, choice))
        if value <= 0:
            raise InvalidArgument("sequence_id must be non-zero")
        return f"u{value}"
    if choice == "string_param":
        if not param.string_param:
            raise InvalidArgument("sequence_id must be non-empty")
        return f"s{param.string_param}"
    raise InvalidArgument(f"sequence_id must be a uint64 or a string, got {choice}")


def _metadata_tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=_DTYPES[spec.dtype][0], shape=[-1, *spec.shape]
    )


def _input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: TensorSpec
) -> np.ndarray:
    expected = _DTYPES[spec.dtype][0]
    if tensor.datatype != expected:
        raise InvalidArgument(
            f"input {tensor.name!r}: datatype {tensor.datatype}, the model takes {expected}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if shape != (1, *spec.shape):
        raise InvalidArgument(
            f"input {tensor.name!r}: shape {list(shape)}, expected {[1, *spec.shape]} "
            "(one step of one sequence per request)"
        )
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(raw)} bytes of data for shape {list(shape)} "
                f"{tensor.datatype} ({count * dtype.itemsize} expected)"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(spec.shape)
    field = _DTYPES[spec.dtype][2]
    values = list(getattr(tensor.contents, field)) if field else []
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name!r}: {len(values)} value(s) in contents, {count} expected"
        )
    return np.asarray(values, dtype=spec.dtype).reshape(spec.shape)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self, engine: SessionEngine, catalog: ModelCatalog, *, ready: Callable[[], bool]
    ) -> None:
        self.engine = engine
        self.catalog = catalog
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
        versions = self.catalog.models.get(request.name, {})
        ready = bool(versions) and (not request.version or request.version in versions)
        return pb.ModelReadyResponse(ready=ready and self.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="rnnserve", version=_version(), extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        loaded = self.catalog.get(request.name, request.version or None)
        sig = loaded.signature
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=self.catalog.versions(loaded.name),
            platform=PLATFORM,
            inputs=[_metadata_tensor(s) for s in (*sig.inputs, *sig.constants)],
            outputs=[_metadata_tensor(s) for s in sig.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(
            config=model_config(self.catalog.get(request.name, request.version or None))
        )

    # -- inference --------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        namespace = namespace_var.get()

        async def answer(request: pb.ModelInferRequest) -> None:
            namespace_var.set(namespace)
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except Exception as exc:  # an error answers this request; the stream goes on
                _, message = describe(exc)
                reply = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            finally:
                window.release()
            await replies.put(reply)

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for request in requests:
                    await window.acquire()
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await replies.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader
        finally:
            reader.cancel()

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = request.model_name
        loaded = self.catalog.get(model, request.model_version or None)
        sig = loaded.signature
        params = request.parameters
        session_id = session_id_of(params, model)
        start = bool(_parameter(params, "sequence_start"))
        end = bool(_parameter(params, "sequence_end"))
        inputs, constants = self._decode_inputs(request, sig)
        namespace = namespace_var.get()
        if start:
            await self.engine.start(
                model,
                session_id,
                version=loaded.version,
                constants=constants,
                namespace=namespace,
            )
        try:
            result = await self.engine.step(
                model,
                session_id,
                inputs,
                version=loaded.version,
                request_id=request.id or None,
                namespace=namespace,
            )
        except SessionNotFound as exc:
            raise InvalidArgument(
                f"inference request for sequence {session_id[1:]} to model {model!r} must "
                "specify the START flag on the first request of the sequence"
            ) from exc
        if end:
            await self.engine.end(model, session_id, namespace=namespace)
        return self._response(request, loaded, result.outputs)

    def _decode_inputs(
        self, request: pb.ModelInferRequest, sig: StepSignature
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        specs = {s.name: s for s in (*sig.inputs, *sig.constants)}
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} input(s)"
            )
        arrays: dict[str, np.ndarray] = {}
        for position, tensor in enumerate(request.inputs):
            spec = specs.get(tensor.name)
            if spec is None:
                raise InvalidArgument(
                    f"unknown input {tensor.name!r}; model {request.model_name!r} takes "
                    f"{sorted(specs)}"
                )
            if tensor.name in arrays:
                raise InvalidArgument(f"input {tensor.name!r} is given twice")
            arrays[tensor.name] = _input_array(tensor, raw[position] if raw else None, spec)
        inputs = {s.name: arrays[s.name] for s in sig.inputs if s.name in arrays}
        constants = {s.name: arrays[s.name] for s in sig.constants if s.name in arrays}
        return inputs, constants

    def _response(
        self, request: pb.ModelInferRequest, loaded: LoadedModel, outputs: list[np.ndarray]
    ) -> pb.ModelInferResponse:
        wanted = {o.name for o in request.outputs}
        known = {s.name for s in loaded.signature.outputs}
        unknown = sorted(wanted - known)
        if unknown:
            raise InvalidArgument(f"unknown output(s) {unknown}; the model gives {sorted(known)}")
        response = pb.ModelInferResponse(
            model_name=loaded.name, model_version=loaded.version, id=request.id
        )
        for spec, value in zip(loaded.signature.outputs, outputs, strict=True):
            if wanted and spec.name not in wanted:
                continue
            array = np.asarray(value, dtype=np.dtype(spec.dtype).newbyteorder("<"))
            response.outputs.append(
                pb.ModelInferResponse.InferOutputTensor(
                    name=spec.name, datatype=_DTYPES[spec.dtype][0], shape=[1, *spec.shape]
                )
            )
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response


def model_config(loaded: LoadedModel) -> config_pb.ModelConfig:
    """The model as Triton describes a sequence model with implicit state."""
    sig = loaded.signature
    cfg = loaded.config
    seq = config_pb.ModelSequenceBatching(
        max_sequence_idle_microseconds=int(cfg.idle_timeout_s * 1e6),
        oldest=config_pb.ModelSequenceBatching.StrategyOldest(
            max_candidate_sequences=cfg.max_queue_size,
            preferred_batch_size=[cfg.max_batch_size],
            max_queue_delay_microseconds=int(cfg.max_queue_delay_s * 1e6),
            preserve_ordering=True,
        ),
        state=[
            config_pb.ModelSequenceBatching.State(
                input_name=s.name,
                output_name=s.name,
                data_type=_DTYPES[s.dtype][1],
                dims=list(s.shape),
            )
            for s in sig.states
        ],
    )
    return config_pb.ModelConfig(
        name=loaded.name,
        platform=PLATFORM,
        backend="rnnserve",
        max_batch_size=cfg.max_batch_size,
        input=[
            config_pb.ModelInput(name=s.name, data_type=_DTYPES[s.dtype][1], dims=list(s.shape))
            for s in sig.inputs
        ]
        + [
            config_pb.ModelInput(
                name=s.name, data_type=_DTYPES[s.dtype][1], dims=list(s.shape), optional=True
            )
            for s in sig.constants
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_DTYPES[s.dtype][1], dims=list(s.shape))
            for s in sig.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(kind=config_pb.ModelInstanceGroup.KIND_CPU, count=1)
        ],
        sequence_batching=seq,
    )
