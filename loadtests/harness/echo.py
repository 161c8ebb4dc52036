"""An echo gRPC server with rnnserve's messages: the transport ceiling of one Python process.

    .venv/bin/python -m loadtests.harness.echo --port 8102

It serves `rnnserve.v1.Recurrent` (StartSession, Step, StepStream, RunSequence, StepMany,
StepManyStream, EndSession)
and KServe `ModelInfer` / `ModelStreamInfer` on a `grpc.aio` server with the same options
as rnnserve's, and answers each request at once with a reply of the same size as the
benchmark models' (one float32 output `y` of 64 values per step): no model, no state, no
batching. Whatever a peer does beyond this costs it throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from grpc import aio

from rnnserve.protocol.inference import grpc_service_pb2 as kpb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kpb_grpc
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

OUTPUTS = 64
_Y = np.zeros(OUTPUTS, np.float32).tobytes()


class EchoRecurrent(pb_grpc.RecurrentServicer):  # type: ignore[misc]
    def __init__(self, *, suspend: bool = False) -> None:
        # `suspend`: unary handlers await a future that a later loop iteration settles
        # (as rnnserve's await their batch) instead of returning at once.
        self.suspend = suspend

    async def StartSession(self, request: Any, context: Any) -> Any:
        return pb.StartSessionResponse(
            session=pb.SessionInfo(session_id=request.session_id, model=request.model)
        )

    async def EndSession(self, request: Any, context: Any) -> Any:
        return pb.EndSessionResponse(existed=True)

    def _reply(self, request: Any) -> Any:
        return pb.StepResponse(
            session_id=request.session_id,
            seq=request.seq + 1,
            request_id=request.request_id,
            outputs=[pb.Tensor(name="y", dtype="float32", shape=[OUTPUTS], data=_Y)],
        )

    async def Step(self, request: Any, context: Any) -> Any:
        if self.suspend:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.call_soon(done.set_result, None)
            await done
        return self._reply(request)

    async def StepStream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield self._reply(request)

    async def RunSequence(self, request: Any, context: Any) -> Any:
        steps = int(request.inputs[0].shape[0]) if request.inputs else 1
        return pb.RunSequenceResponse(
            session_id=request.session_id,
            seq=request.seq + steps,
            outputs=[pb.Tensor(name="y", dtype="float32", shape=[steps, OUTPUTS], data=_Y * steps)],
        )

    def _many(self, request: Any) -> Any:
        rows = len(request.session_ids)
        return pb.StepManyResponse(
            batch_id=request.batch_id,
            session_ids=request.session_ids,
            codes=[0] * rows,
            messages=[""] * rows,
            seqs=[1] * rows,
            replayed=[False] * rows,
            outputs=[pb.Tensor(name="y", dtype="float32", shape=[rows, OUTPUTS], data=_Y * rows)],
        )

    async def StepMany(self, request: Any, context: Any) -> Any:
        return self._many(request)

    async def StepManyStream(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self._many(request)


def _infer_response(request: Any) -> Any:
    return kpb.ModelInferResponse(
        model_name=request.model_name,
        model_version="1",
        id=request.id,
        outputs=[
            kpb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=[1, OUTPUTS])
        ],
        raw_output_contents=[_Y],
    )


class _Holder:
    """`--hold-ms`: calls wait for the next tick, which settles all of them at once (as a
    batch settles its steps), so many calls are in flight in gRPC as in rnnserve."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.pending: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self._run())
        done = loop.create_future()
        self.pending.append(done)
        await done

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.hold_s)
            due, self.pending = self.pending, []
            for done in due:
                done.set_result(None)


class EchoInference(kpb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, holder: _Holder | None = None) -> None:
        self.holder = holder

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return kpb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return kpb.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if self.holder is not None:
            await self.holder.wait()
        return _infer_response(request)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield kpb.ModelStreamInferResponse(infer_response=_infer_response(request))


async def serve(
    host: str, port: int, *, suspend: bool = False, acceptors: int = 1, hold_ms: float = 0.0
) -> None:
    """`acceptors` gRPC servers on the port (SO_REUSEPORT between them), as rnnserve's
    `--acceptors` runs them."""
    servers = []
    holder = _Holder(hold_ms / 1000) if hold_ms > 0 else None
    for _ in range(acceptors):
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", int(acceptors > 1)),
            ]
        )
        pb_grpc.add_RecurrentServicer_to_server(EchoRecurrent(suspend=suspend), server)  # type: ignore[no-untyped-call]
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoInference(holder), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        servers.append(server)
    print(f"echo listening on port {port} (pid {os.getpid()})", flush=True)
    await servers[0].wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--suspend", action="store_true", help="unary Step awaits a future settled later"
    )
    parser.add_argument("--acceptors", type=int, default=1, help="gRPC servers on the port")
    parser.add_argument(
        "--hold-ms", type=float, default=0.0, help="ModelInfer waits for a tick every N ms"
    )
    args = parser.parse_args()
    asyncio.run(
        serve(
            args.host,
            args.port,
            suspend=args.suspend,
            acceptors=args.acceptors,
            hold_ms=args.hold_ms,
        )
    )


if __name__ == "__main__":
    main()
