"""Helpers of the gRPC integration tests: servers per module, stubs, tensors, references."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.wire import decode_tensor, encode_tensor
from tests.models import FEATURES, reference
from tests.redis_servers import delete_namespace
from tests.servers import ServerThread

__all__ = [
    "FEATURES",
    "cached_reference",
    "decode_tensor",
    "delete_namespace",
    "native_stub",
    "pb",
    "pb_grpc",
    "rpc_error",
    "running_server",
    "tensor",
    "xs",
]


def tensor(name: str, array: Any) -> pb.Tensor:
    return encode_tensor(name, np.asarray(array))


def xs(batch: int, steps: int, seed: int = 0, features: int = FEATURES) -> np.ndarray:
    """Inputs `(batch, steps, features)` in float32."""
    return np.random.default_rng(seed).normal(size=(batch, steps, features)).astype("float32")


@functools.cache
def _reference(repo: str, name: str, data: bytes, shape: tuple[int, ...], ctx: bytes) -> Any:
    inputs = np.frombuffer(data, "float32").reshape(shape)
    constants = np.frombuffer(ctx, "float32").reshape(shape[0], -1) if ctx else None
    return reference(Path(repo), name, inputs, constants)


def cached_reference(repo: Path, name: str, inputs: np.ndarray, constants: Any = None) -> Any:
    """`reference(...)`, loading each model once per input (it reloads the model otherwise)."""
    ctx = b"" if constants is None else np.asarray(constants, "float32").tobytes()
    return _reference(str(repo), name, inputs.tobytes(), inputs.shape, ctx)


def native_stub(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> tuple[grpc.Channel, pb_grpc.RecurrentStub]:
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    return channel, pb_grpc.RecurrentStub(channel)


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The `grpc.RpcError` that `call(*args)` raises (fails the test if it does not)."""
    try:
        result = call(*args, **kwargs)
        if isinstance(result, grpc.Call):  # a stream: the status comes with its end
            result = list(result)  # type: ignore[call-overload]
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"expected an RPC error, got {result!r}")


@contextlib.contextmanager
def running_server(
    repo: Path, *, redis_url: str | None = None, **options: Any
) -> Iterator[ServerThread]:
    """A `ServerThread` on port 0; with `redis_url`, in a namespace of its own (deleted after)."""
    from rnnserve.service.settings import Settings

    settings: dict[str, Any] = {"model_repository": repo, "port": 0, "host": "127.0.0.1"}
    namespace = f"test-grpc-{uuid.uuid4().hex[:10]}"
    if redis_url is not None:
        settings |= {"redis_url": redis_url, "namespace": namespace}
    with ServerThread(Settings(**(settings | options))) as server:
        yield server
    if redis_url is not None:
        delete_namespace(redis_url, namespace)
