"""Tensors on the wire: `rnnserve.v1.Tensor` <-> numpy, checked at the boundary.

A tensor travels as a numpy dtype name, a shape and raw little-endian bytes in
C order. Decoding checks the dtype is one we serve and that the bytes are
exactly shape x itemsize, so a malformed message is an INVALID_ARGUMENT naming
the tensor, never a crash or a silently reshaped array. Names, shapes and
dtypes against the model's signature are checked by the engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rnnserve.core import TensorSpec
from rnnserve.service._generated.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.service.errors import InvalidArgument

SERVED_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_DIMS = 8


def decode_tensor(tensor: pb.Tensor, *, role: str = "tensor") -> np.ndarray:
    """A read-only numpy view of the tensor's bytes, after checking they fit."""
    name = tensor.name or "<unnamed>"
    if tensor.dtype not in SERVED_DTYPES:
        raise InvalidArgument(
            f"{role} {name!r}: dtype {tensor.dtype!r} is not one of {sorted(SERVED_DTYPES)}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"{role} {name!r}: invalid shape {list(shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(tensor.data):
        raise InvalidArgument(
            f"{role} {name!r}: shape {list(shape)} x {dtype.itemsize} byte(s) needs "
            f"{expected} bytes of data, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def decode_named(tensors: Iterable[pb.Tensor], *, role: str) -> dict[str, np.ndarray]:
    """Tensors by name; a repeated or empty name is an error."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if not tensor.name:
            raise InvalidArgument(f"every {role} tensor needs a name")
        if tensor.name in arrays:
            raise InvalidArgument(f"{role} {tensor.name!r} is given twice")
        arrays[tensor.name] = decode_tensor(tensor, role=role)
    return arrays


def encode_tensor(name: str, array: Any) -> pb.Tensor:
    value = np.asarray(array)
    little = value.astype(value.dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(
        name=name,
        dtype=value.dtype.name,
        shape=list(value.shape),
        data=np.ascontiguousarray(little).tobytes(),
    )


def encode_named(specs: Sequence[TensorSpec], arrays: Sequence[Any]) -> list[pb.Tensor]:
    return [encode_tensor(spec.name, array) for spec, array in zip(specs, arrays, strict=True)]


def spec_message(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))
