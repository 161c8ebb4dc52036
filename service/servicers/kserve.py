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

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np
from grpc import aio

from rnnserve.core import StepSignature, TensorSpec
from rnnserve.protocol.inference import grpc_service_pb2 as pb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.protocol.inference import model_config_pb2 as config_pb
from rnnserve.service.engine import ModelRunner, SessionEngine, StepResult
from rnnserve.service.errors import InvalidArgument, SessionNotFound
from rnnserve.service.servicers._streams import answer_concurrently
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


def rnnserve_version() -> str:
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
        value = int(getattr(param, choice)) % 2**64  # Triton: the int64's bits as uint64
        if value == 0:
            raise InvalidArgument(
                f"inference request to model {model!r} must specify a non-zero sequence_id"
            )
        return f"u{value}"
    if choice == "string_param":
        if not param.string_param:
            raise InvalidArgument(
                f"inference request to model {model!r} must specify a non-empty sequence_id"
            )
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
    # A scalar per sample may also come as [1, 1]: Triton's dims [1] + reshape [].
    if shape != (1, *spec.shape) and not (spec.shape == () and shape == (1, 1)):
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


def _check_requested_outputs(request: pb.ModelInferRequest, sig: StepSignature) -> None:
    known = {s.name for s in sig.outputs}
    unknown = sorted({o.name for o in request.outputs} - known)
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model gives {sorted(known)}")


class _Turn:
    """When one stream request may run, and telling the next request of its sequence
    when it may (see `_SequenceOrder`)."""

    def __init__(
        self,
        after: asyncio.Future[None] | None,
        gate: asyncio.Future[None],
        done: asyncio.Future[None],
        *,
        pipelined: bool,
    ) -> None:
        self._after = after
        self._gate = gate
        self._done = done
        self._pipelined = pipelined

    async def wait(self) -> None:
        if self._after is not None and not self._after.done():
            # shield: a cancelled request must not cancel the future another waits on.
            await asyncio.shield(self._after)

    def submitting(self) -> None:
        """Called right before the step goes to the engine: the next plain step of the
        sequence may follow (it runs only once this request suspends, i.e. after the
        step is in the batcher's queue, which keeps the order)."""
        if self._pipelined and not self._gate.done():
            self._gate.set_result(None)

    def finish(self) -> None:
        for future in (self._gate, self._done):
            if not future.done():
                future.set_result(None)


def _all_done(futures: list[asyncio.Future[None]]) -> asyncio.Future[None] | None:
    pending = [f for f in futures if not f.done()]
    if not pending:
        return None
    combined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(pending)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not combined.done():
            combined.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    return combined


class _Chain:
    __slots__ = ("gate", "pending")

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] | None = None  # the last request's gate
        self.pending: list[asyncio.Future[None]] = []  # `done` of unfinished requests


class _SequenceOrder:
    """The requests of one sequence in one stream take effect in the order they came.

    Each request waits for the gate of the one before it in its sequence. A plain
    step opens its gate when it hands its step to the engine, so the steps of a
    sequence are pipelined in the batcher's queue. A START or END opens its gate when
    it is complete (the session exists, or is gone), and a START also waits for every
    earlier request of its sequence to complete (it replaces the session they step).
    Requests of different sequences, or without a usable sequence id, do not wait.
    """

    def __init__(self) -> None:
        self._chains: dict[tuple[str, str], _Chain] = {}

    def turn(self, request: pb.ModelInferRequest) -> _Turn:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        params = request.parameters
        try:
            key = (request.model_name, session_id_of(params, request.model_name))
        except InvalidArgument:
            return _Turn(None, gate, done, pipelined=True)
        start = bool(_parameter(params, "sequence_start"))
        end = bool(_parameter(params, "sequence_end"))
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = _Chain()
        chain.pending = [f for f in chain.pending if not f.done()]
        after = _all_done(chain.pending) if start else chain.gate
        chain.gate = gate
        chain.pending.append(done)

        def finished(_: asyncio.Future[None]) -> None:
            # Forget the sequence once all its requests so far are done.
            if self._chains.get(key) is chain and all(f.done() for f in chain.pending):
                del self._chains[key]

        done.add_done_callback(finished)
        return _Turn(after, gate, done, pipelined=not (start or end))


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
            inputs=[_metadata_tensor(s) for s in (*sig.inputs, *sig.constants)],
            outputs=[_metadata_tensor(s) for s in sig.outputs],
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
        order = _SequenceOrder()

        async def answer(request: pb.ModelInferRequest, turn: _Turn) -> pb.ModelStreamInferResponse:
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
        start = bool(_parameter(params, "sequence_start"))
        end = bool(_parameter(params, "sequence_end"))
        inputs, constants = self._decode_inputs(request, sig, start=start)
        _check_requested_outputs(request, sig)
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
        return self._response(request, result)

    def _decode_inputs(
        self, request: pb.ModelInferRequest, sig: StepSignature, *, start: bool
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The step's inputs and (START only) the sequence's constants, all checked
        before anything changes."""
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
        missing = [s.name for s in sig.inputs if s.name not in arrays]
        if start:
            missing += [s.name for s in sig.constants if s.name not in arrays]
        if missing:
            raise InvalidArgument(
                f"model {request.model_name!r}: missing input(s) {missing}"
                + (" (constants come with the sequence_start request)" if sig.constants else "")
            )
        constant_names = [s.name for s in sig.constants if s.name in arrays]
        if constant_names and not start:
            raise InvalidArgument(
                f"input(s) {constant_names} of model {request.model_name!r} are constant for "
                "the whole sequence: send them with the sequence_start request only"
            )
        inputs = {s.name: arrays[s.name] for s in sig.inputs}
        constants = {name: arrays[name] for name in constant_names}
        return inputs, constants

    @staticmethod
    def _response(request: pb.ModelInferRequest, result: StepResult) -> pb.ModelInferResponse:
        """The reply from the step's own result: the version and output specs that made it."""
        wanted = {o.name for o in request.outputs}
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=result.version, id=request.id
        )
        for spec, value in zip(result.output_specs, result.outputs, strict=True):
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


def _dims(spec: TensorSpec) -> dict[str, Any]:
    """`dims` of a tensor in a Triton config; a scalar is dims [1] + reshape [], as Triton
    requires non-empty dims."""
    if spec.shape:
        return {"dims": list(spec.shape)}
    return {"dims": [1], "reshape": config_pb.ModelTensorReshape(shape=[])}


def model_config(loaded: ModelRunner) -> config_pb.ModelConfig:
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
                dims=list(s.shape) or [1],
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
            config_pb.ModelInput(name=s.name, data_type=_DTYPES[s.dtype][1], **_dims(s))
            for s in sig.inputs
        ]
        + [
            config_pb.ModelInput(
                name=s.name, data_type=_DTYPES[s.dtype][1], optional=True, **_dims(s)
            )
            for s in sig.constants
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_DTYPES[s.dtype][1], **_dims(s))
            for s in sig.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(kind=config_pb.ModelInstanceGroup.KIND_CPU, count=1)
        ],
        sequence_batching=seq,
    )
