"""Plain values of the client: tensors on the wire, signatures, session info, retries.

Nothing here does I/O; the sync and asyncio clients share it.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import numpy as np

from rnnserve.client._convert import convert
from rnnserve.client._exceptions import ClientError, InvalidRequest, from_status, status_code
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb

__all__ = [
    "ExportedState",
    "Inputs",
    "ManyResult",
    "ModelInfo",
    "Outputs",
    "RetryPolicy",
    "SessionInfo",
    "Signature",
    "TensorSpec",
]

#: An array-like (models with one input: numpy array, list, number) or a mapping
#: of array-likes by input name. Values are converted to the signature's dtypes by
#: lossless casts only (`rnnserve.client.convert`).
Inputs: TypeAlias = Any
#: One array (models with one output) or arrays by output name.
Outputs: TypeAlias = "np.ndarray | dict[str, np.ndarray]"

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How UNAVAILABLE / DEADLINE_EXCEEDED calls are retried.

    Each retry goes to the next address (round robin; with one address, the same
    one) after a jittered exponential backoff. `attempts` counts the first try.
    """

    attempts: int = 6
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")

    def backoff_s(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based), with full jitter."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # one sample, no batch axis


@dataclass(frozen=True)
class Signature:
    """What one step of a model version takes and gives (GetModelSignature)."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    constants: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    idle_timeout_s: float
    max_sequence_length: int
    #: Free-form strings about the model (its config.yaml's `metadata:`).
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: pb.ModelSignature) -> Signature:
        def specs(items: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(s.name, s.dtype, tuple(int(d) for d in s.shape)) for s in items)

        return cls(
            model=message.model,
            version=message.version,
            inputs=specs(message.inputs),
            constants=specs(message.constants),
            states=specs(message.states),
            outputs=specs(message.outputs),
            max_batch_size=int(message.max_batch_size),
            idle_timeout_s=float(message.idle_timeout_seconds),
            max_sequence_length=int(message.max_sequence_length),
            metadata=dict(message.metadata),
        )

    def to_dict(self) -> dict[str, Any]:
        def rows(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]

        return {
            "model": self.model,
            "version": self.version,
            "inputs": rows(self.inputs),
            "constants": rows(self.constants),
            "states": rows(self.states),
            "outputs": rows(self.outputs),
            "max_batch_size": self.max_batch_size,
            "idle_timeout_s": self.idle_timeout_s,
            "max_sequence_length": self.max_sequence_length,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: str
    seq: int
    created_unix: float
    updated_unix: float
    expires_in_s: float | None

    @classmethod
    def from_message(cls, message: pb.SessionInfo) -> SessionInfo:
        return cls(
            session_id=message.session_id,
            model=message.model,
            version=message.version,
            seq=int(message.seq),
            created_unix=message.created_unix,
            updated_unix=message.updated_unix,
            expires_in_s=(
                message.expires_in_seconds if message.HasField("expires_in_seconds") else None
            ),
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: tuple[str, ...]
    default_version: str


# -- tensors ---------------------------------------------------------------------------
def encode_tensor(name: str, array: Any, dtype: str | None = None) -> pb.Tensor:
    """`array` as dtype + shape + little-endian C-order bytes (cast to `dtype` if given)."""
    value = np.asarray(array, dtype=dtype)
    little = value.astype(value.dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(
        name=name,
        dtype=value.dtype.name,
        shape=list(value.shape),
        data=np.ascontiguousarray(little).tobytes(),
    )


def decode_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A writable numpy copy of a tensor from the server."""
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.shape)
    if math.prod(shape) * dtype.itemsize != len(tensor.data):
        raise InvalidRequest(f"tensor {tensor.name!r}: {len(tensor.data)} bytes for {shape}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(tensor.dtype)


def encode_named(specs: Sequence[TensorSpec], values: Inputs, *, role: str) -> list[pb.Tensor]:
    """Tensors for `specs` from one array (single-spec models) or a mapping by name.

    Values are converted to the spec's dtype by lossless casts only (`convert`), so
    JSON lists and Python numbers work, and a value that would change is refused.
    """
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - {s.name for s in specs})
        missing = [s.name for s in specs if s.name not in values]
        if unknown or missing:
            raise InvalidRequest(
                f"{role}s: expected {[s.name for s in specs]}"
                + (f", unknown {unknown}" if unknown else "")
                + (f", missing {missing}" if missing else "")
            )
        return [
            encode_tensor(s.name, convert(values[s.name], s.dtype, name=s.name, role=role))
            for s in specs
        ]
    if len(specs) != 1:
        raise InvalidRequest(
            f"this model has {len(specs)} {role}s {[s.name for s in specs]}: pass a dict by name"
        )
    spec = specs[0]
    return [encode_tensor(spec.name, convert(values, spec.dtype, name=spec.name, role=role))]


def decode_outputs(tensors: Sequence[pb.Tensor]) -> dict[str, np.ndarray]:
    return {t.name: decode_tensor(t) for t in tensors}


def simplify(outputs: dict[str, np.ndarray]) -> Outputs:
    """A single array when there is one output, else the dict."""
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def sequence_length(specs: Sequence[TensorSpec], xs: Inputs) -> int:
    """T of a `(T, ...)` sequence given as one array or a mapping by input name."""
    first = xs[specs[0].name] if isinstance(xs, Mapping) and specs else xs
    shape: tuple[int, ...] = np.shape(first)
    if not shape:
        raise InvalidRequest("a sequence needs a leading time axis (T, ...)")
    return int(shape[0])


def slice_sequence(specs: Sequence[TensorSpec], xs: Inputs, start: int) -> Inputs:
    if isinstance(xs, Mapping):
        return {s.name: np.asarray(xs[s.name])[start:] for s in specs}
    return np.asarray(xs)[start:]


def step_of(specs: Sequence[TensorSpec], xs: Inputs, t: int) -> Inputs:
    if isinstance(xs, Mapping):
        return {s.name: np.asarray(xs[s.name])[t] for s in specs}
    return np.asarray(xs)[t]


def stack_outputs(steps: Sequence[dict[str, np.ndarray]], specs: Sequence[TensorSpec]) -> Outputs:
    """Per-step output dicts -> `(T, ...)` arrays by name (simplified)."""
    return simplify({s.name: np.stack([step[s.name] for step in steps]) for s in specs})


# -- ids and addresses -----------------------------------------------------------------
def new_id() -> str:
    return uuid.uuid4().hex


class RequestIds:
    """Request ids of one session handle: `<prefix>.<n>`, one per logical step.

    A retry reuses its step's id (that is what makes it exactly-once); a new step
    never reuses an old one, even after a reset.
    """

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}.{self._n}"


def normalize_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"`, `"a:1"` or `["a:1", "b:2"]` -> `("a:1", "b:2")`."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    cleaned = tuple(a.strip() for a in items if a.strip())
    if not cleaned:
        raise ValueError("at least one address (host:port) is needed")
    return cleaned


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect quickly after a replica restarts; retries pace themselves.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def retry_schedule(policy: RetryPolicy) -> Iterator[float]:
    """Backoffs before each retry: `attempts - 1` of them."""
    for retry in range(policy.attempts - 1):
        yield policy.backoff_s(retry)


@dataclass(frozen=True)
class ExportedState:
    """A session's whole record (give `record` to `import_` as is) and its tensors."""

    info: SessionInfo
    record: bytes
    states: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]

    @classmethod
    def from_message(cls, message: pb.ExportStateResponse) -> ExportedState:
        return cls(
            info=SessionInfo.from_message(message.session),
            record=bytes(message.record),
            states=decode_outputs(message.states),
            constants=decode_outputs(message.constants),
        )


@dataclass(frozen=True, eq=False)
class ManyResult:
    """The reply to one `step_many` message: K rows, row k the step of `session_ids[k]`.

    Each row succeeds or fails on its own: `codes[k]` is `grpc.StatusCode.OK` for a row
    that was applied (or replayed), else the row's error, with `messages[k]`; a failed
    row's outputs hold zeros and its seq is 0. `seqs[k]` is the session's seq after
    row k's step; `replayed[k]` is True for the stored reply of a retried step.
    """

    session_ids: tuple[str, ...]
    #: One array per signature output, shaped (K, ...).
    outputs: dict[str, np.ndarray]
    seqs: np.ndarray  # uint64, (K,)
    replayed: np.ndarray  # bool, (K,)
    codes: tuple[grpc.StatusCode, ...]
    messages: tuple[str, ...]
    #: Row k's `ErrorDetail` (reason, seqs) when some row failed; empty when all are OK.
    details: tuple[pb.ErrorDetail, ...] = ()

    @classmethod
    def from_message(cls, message: pb.StepManyResponse) -> ManyResult:
        return cls(
            session_ids=tuple(message.session_ids),
            outputs=decode_outputs(message.outputs),
            seqs=np.array(message.seqs, dtype=np.uint64),
            replayed=np.array(message.replayed, dtype=bool),
            codes=tuple(status_code(code) for code in message.codes),
            messages=tuple(message.messages),
            details=tuple(message.details),
        )

    @property
    def ok(self) -> np.ndarray:
        """A bool mask of the rows that were applied (or replayed)."""
        return np.array([code is grpc.StatusCode.OK for code in self.codes], dtype=bool)

    def errors(self) -> dict[int, ClientError]:
        """The failed rows: row index -> the error a single `step` would have raised."""
        return {
            k: from_status(code, message or code.name, self.details[k] if self.details else None)
            for k, (code, message) in enumerate(zip(self.codes, self.messages, strict=True))
            if code is not grpc.StatusCode.OK
        }


def _rows(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str | bytes):
        raise InvalidRequest(f"{name}: a sequence of strings (one per row), not one string")
    return list(values)


def many_request(
    signature: Signature,
    session_ids: Sequence[str],
    inputs: Inputs,
    *,
    seqs: Iterable[int | None] | None,
    request_ids: Sequence[str] | None,
    batch_id: str = "",
) -> pb.StepManyRequest:
    """A StepMany message: one row per session id, inputs shaped (K, ...).

    A row's seq None travels as -1 (no seq). Without `request_ids`, the rows get fresh
    ids made here, so resending the same message (a retry) is exactly-once for the
    rows that carry a seq.
    """
    ids = _rows("session_ids", session_ids)
    if request_ids is None:
        prefix = new_id()[:16]
        request_ids = [f"{prefix}.{k}" for k in range(len(ids))]
    return pb.StepManyRequest(
        model=signature.model,
        version=signature.version,
        session_ids=ids,
        inputs=encode_named(signature.inputs, inputs, role="input"),
        seqs=[] if seqs is None else [-1 if seq is None else int(seq) for seq in seqs],
        request_ids=_rows("request_ids", request_ids),
        batch_id=batch_id,
    )


def channel_credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    """None for plaintext; `True`: TLS with the system's root certificates."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    if tls is False:
        return None
    return tls


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
