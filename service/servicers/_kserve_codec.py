"""The KServe v2 / Triton codec: tensors, parameters and configs on the wire.

Datatypes (`DTYPES`), a request's inputs as checked numpy arrays (`decode_inputs`), a
step's result as a reply (`infer_response`), the sequence parameters (`parameter`,
`session_id_of`) and the model as Triton describes it (`metadata_tensor`,
`model_config`). No I/O and no engine calls: the servicer (`kserve.py`) does those.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rnnserve.core import StepSignature, TensorSpec
from rnnserve.protocol.inference import grpc_service_pb2 as pb
from rnnserve.protocol.inference import model_config_pb2 as config_pb
from rnnserve.service.errors import InvalidArgument
from rnnserve.service.runner import ModelRunner, StepResult

PLATFORM = "rnnserve_keras"

# numpy dtype name -> (KServe datatype, Triton model_config DataType, contents field)
DTYPES: Mapping[str, tuple[str, Any, str]] = {
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


def parameter(params: Mapping[str, pb.InferParameter], name: str) -> Any:
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


def metadata_tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=DTYPES[spec.dtype][0], shape=[-1, *spec.shape]
    )


class _Wire:
    """What a tensor of one spec looks like on the KServe wire, worked out once per spec
    (a request is checked against it without building dtypes or shapes per call)."""

    __slots__ = ("count", "datatype", "dtype", "field", "nbytes", "shapes")

    def __init__(self, spec: TensorSpec) -> None:
        self.datatype, _, self.field = DTYPES[spec.dtype]
        self.dtype = np.dtype(spec.dtype).newbyteorder("<")
        self.count = math.prod(spec.shape)
        self.nbytes = self.count * self.dtype.itemsize
        # A scalar per sample may also come as [1, 1]: Triton's dims [1] + reshape [].
        self.shapes = ((1, *spec.shape),) + (((1, 1),) if spec.shape == () else ())


@functools.cache
def _wire(spec: TensorSpec) -> _Wire:
    return _Wire(spec)


def input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: TensorSpec
) -> np.ndarray:
    wire = _wire(spec)
    if tensor.datatype != wire.datatype:
        raise InvalidArgument(
            f"input {tensor.name!r}: datatype {tensor.datatype}, the model takes {wire.datatype}"
        )
    shape = tuple(tensor.shape)
    if shape not in wire.shapes:
        raise InvalidArgument(
            f"input {tensor.name!r}: shape {list(shape)}, expected {[1, *spec.shape]} "
            "(one step of one sequence per request)"
        )
    if raw is not None:
        if len(raw) != wire.nbytes:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(raw)} bytes of data for shape {list(shape)} "
                f"{tensor.datatype} ({wire.nbytes} expected)"
            )
        return np.frombuffer(raw, dtype=wire.dtype).reshape(spec.shape)
    values = list(getattr(tensor.contents, wire.field)) if wire.field else []
    if len(values) != wire.count:
        raise InvalidArgument(
            f"input {tensor.name!r}: {len(values)} value(s) in contents, {wire.count} expected"
        )
    return np.asarray(values, dtype=spec.dtype).reshape(spec.shape)


def check_requested_outputs(request: pb.ModelInferRequest, sig: StepSignature) -> None:
    if not request.outputs:  # all of them (what tritonclient asks by default)
        return
    known = {s.name for s in sig.outputs}
    unknown = sorted({o.name for o in request.outputs} - known)
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model gives {sorted(known)}")


@functools.lru_cache(maxsize=256)
def _specs_by_name(sig: StepSignature) -> Mapping[str, TensorSpec]:
    return {s.name: s for s in (*sig.inputs, *sig.constants)}


def decode_inputs(
    request: pb.ModelInferRequest, sig: StepSignature, *, start: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The step's inputs and (START only) the sequence's constants, all checked
    before anything changes."""
    specs = _specs_by_name(sig)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} input(s)")
    arrays: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"unknown input {tensor.name!r}; model {request.model_name!r} takes {sorted(specs)}"
            )
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        arrays[tensor.name] = input_array(tensor, raw[position] if raw else None, spec)
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


def infer_response(request: pb.ModelInferRequest, result: StepResult) -> pb.ModelInferResponse:
    """The reply from the step's own result: the version and output specs that made it."""
    wanted = {o.name for o in request.outputs}
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=result.version, id=request.id
    )
    outputs, contents = response.outputs, response.raw_output_contents
    for spec, value in zip(result.output_specs, result.outputs, strict=True):
        if wanted and spec.name not in wanted:
            continue
        wire = _wire(spec)
        outputs.add(name=spec.name, datatype=wire.datatype, shape=wire.shapes[0])
        # tobytes() is C-ordered whatever the array's layout
        contents.append(np.asarray(value, dtype=wire.dtype).tobytes())
    return response


def dims(spec: TensorSpec) -> dict[str, Any]:
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
                data_type=DTYPES[s.dtype][1],
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
            config_pb.ModelInput(name=s.name, data_type=DTYPES[s.dtype][1], **dims(s))
            for s in sig.inputs
        ]
        + [
            config_pb.ModelInput(
                name=s.name, data_type=DTYPES[s.dtype][1], optional=True, **dims(s)
            )
            for s in sig.constants
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=DTYPES[s.dtype][1], **dims(s))
            for s in sig.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(kind=config_pb.ModelInstanceGroup.KIND_CPU, count=1)
        ],
        sequence_batching=seq,
    )
