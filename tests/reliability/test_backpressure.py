"""Backpressure: far more concurrent steps than the queue bound. The excess is refused
at once with RESOURCE_EXHAUSTED (nothing applied), the rest is served (applied once),
and the server's memory stays bounded over repeated bursts."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import grpc
import numpy as np
from grpc import aio

from rnnserve.service._generated.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.service._generated.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import encode_tensor
from tests.reliability._procs import rss_bytes
from tests.servers import FEATURES, ServerThread, write_repository

QUEUE_BOUND = 8
BURST = 256
ROUNDS = 4


async def test_excess_is_refused_quickly_the_rest_served(tmp_path):
    repo = write_repository(tmp_path / "models", max_batch_size=2)
    settings = Settings(
        model_repository=repo, port=0, host="127.0.0.1", warmup=False,
        max_queue_size=QUEUE_BOUND,
    )  # fmt: skip
    served = refused = 0
    refused_s: list[float] = []
    served_s: list[float] = []
    rss: list[int] = []
    x = encode_tensor("x", np.ones(FEATURES, "float32"))
    with ServerThread(settings) as server:
        async with aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecurrentStub(channel)
            for round_ in range(ROUNDS):
                ids = [f"b{round_}-{i}" for i in range(BURST)]
                await asyncio.gather(
                    *(stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=s))
                      for s in ids)
                )  # fmt: skip

                async def one(session: str) -> bool:
                    began = time.monotonic()
                    try:
                        request = pb.StepRequest(model="lstm", session_id=session, inputs=[x])
                        await stub.Step(request, timeout=120)
                    except aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                        assert f"(max_queue_size {QUEUE_BOUND})" in exc.details()
                        refused_s.append(time.monotonic() - began)
                        return False
                    served_s.append(time.monotonic() - began)
                    return True

                outcomes = await asyncio.gather(*(one(s) for s in ids))
                served += sum(outcomes)
                refused += len(outcomes) - sum(outcomes)
                seqs = await asyncio.gather(
                    *(stub.GetSession(pb.SessionRef(model="lstm", session_id=s)) for s in ids)
                )
                # Served steps applied once; refused ones not at all.
                assert [info.seq for info in seqs] == [int(ok) for ok in outcomes]
                for session in ids:
                    await stub.EndSession(pb.SessionRef(model="lstm", session_id=session))
                rss.append(rss_bytes(os.getpid()))
            queued = server.server.engine.runner("lstm").batcher.queued
    assert refused > 0 and served >= QUEUE_BOUND * ROUNDS
    assert queued == 0
    print(
        f"backpressure: {ROUNDS} bursts of {BURST} concurrent steps, queue bound {QUEUE_BOUND}: "
        f"{served} served, {refused} RESOURCE_EXHAUSTED (median {statistics.median(refused_s) * 1000:.0f} ms, "
        f"served median {statistics.median(served_s) * 1000:.0f} ms); "
        f"test-process RSS per burst (MiB): {[round(r / 2**20) for r in rss]}"
    )
