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
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
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
# Wire dtypes are little-endian whatever the host; on a little-endian host these are
# the native dtypes, and encoding needs no byte swap.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SERVED_DTYPES}


def decode_tensor(tensor: pb.Tensor, *, role: str = "tensor") -> np.ndarray:
    """A read-only numpy view of the tensor's bytes, after checking they fit."""
    name = tensor.name or "<unnamed>"
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"{role} {name!r}: dtype {tensor.dtype!r} is not one of {sorted(SERVED_DTYPES)}"
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS or (shape and min(shape) < 0):
        raise InvalidArgument(f"{role} {name!r}: invalid shape {list(shape)}")
    data = tensor.data
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise InvalidArgument(
            f"{role} {name!r}: shape {list(shape)} x {dtype.itemsize} byte(s) needs "
            f"{expected} bytes of data, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


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


def encode_tensor(name: str, array: Any, *, dtype_name: str | None = None) -> pb.Tensor:
    """`dtype_name`: the array's dtype name when the caller knows it (a signature's)."""
    value = np.asarray(array)
    if dtype_name is None or _WIRE_DTYPES.get(dtype_name) != value.dtype:
        dtype_name = value.dtype.name
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
    # tobytes() writes C order whatever the array's layout.
    return pb.Tensor(name=name, dtype=dtype_name, shape=value.shape, data=value.tobytes())


def encode_named(specs: Sequence[TensorSpec], arrays: Sequence[Any]) -> list[pb.Tensor]:
    return [
        encode_tensor(spec.name, array, dtype_name=spec.dtype)
        for spec, array in zip(specs, arrays, strict=True)
    ]


def spec_message(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))
