"""Redis restart mid-load, through the gRPC server: a private redis-server (AOF,
fsync always) is SIGKILLed while 16 sessions step, and restarted a second later.

While it is down every step is answered UNAVAILABLE (retryable) well within its
deadline; clients retry with the same seq + request id; after the restart every
session continues from its last committed step and its outputs equal the offline
reference: no step lost, none applied twice."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc import aio

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import decode_tensor, encode_tensor
from tests.integration._grpc_util import cached_reference
from tests.models import FEATURES
from tests.servers import ServerThread

SESSIONS = 16
STEPS = 30
DEADLINE_S = 15.0  # per call; the store gives up after 5 s, so none may reach it


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_grpc_load(model_repo, aof_redis):
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        redis_url=aof_redis.url, namespace="restart",
    )  # fmt: skip
    xs = np.random.default_rng(5).normal(size=(SESSIONS, STEPS, FEATURES)).astype("float32")
    outputs = np.zeros((SESSIONS, STEPS, 3), "float32")
    progress = [0] * SESSIONS
    codes: dict[str, int] = {}
    outage_codes: dict[str, int] = {}
    slowest_failure = 0.0
    replayed = 0
    down = asyncio.Event()
    warmed = asyncio.Event()

    with ServerThread(settings) as server:
        async with aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecurrentStub(channel)
            for i in range(SESSIONS):
                await stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=f"s{i}"))

            async def drive(i: int) -> None:
                nonlocal slowest_failure, replayed
                t = 0
                while t < STEPS:
                    request = pb.StepRequest(
                        model="lstm", session_id=f"s{i}", seq=t, request_id=f"s{i}-{t}",
                        inputs=[encode_tensor("x", xs[i, t])],
                    )  # fmt: skip
                    began = time.monotonic()
                    try:
                        reply = await stub.Step(request, timeout=DEADLINE_S)
                    except grpc.aio.AioRpcError as exc:
                        name = exc.code().name
                        assert exc.details(), "every error has a message"
                        codes[name] = codes.get(name, 0) + 1
                        if down.is_set():
                            outage_codes[name] = outage_codes.get(name, 0) + 1
                        slowest_failure = max(slowest_failure, time.monotonic() - began)
                        await asyncio.sleep(0.05)
                        continue
                    assert reply.seq == t + 1
                    replayed += reply.replayed
                    outputs[i, t] = decode_tensor(reply.outputs[0])
                    t += 1
                    progress[i] = t
                    if min(progress) >= STEPS // 3:
                        warmed.set()

            drivers = asyncio.gather(*(drive(i) for i in range(SESSIONS)))
            await asyncio.wait_for(warmed.wait(), 120)
            await asyncio.to_thread(aof_redis.kill)
            down.set()
            await asyncio.sleep(1.5)
            stalled = sum(progress)
            down.clear()
            await asyncio.to_thread(aof_redis.start)  # same port, same AOF
            await asyncio.wait_for(drivers, 300)
            infos = [
                await stub.GetSession(pb.SessionRef(model="lstm", session_id=f"s{i}"))
                for i in range(SESSIONS)
            ]

    # Only UNAVAILABLE, never a hang: no DEADLINE_EXCEEDED, no INTERNAL.
    assert set(codes) == {"UNAVAILABLE"}, codes
    assert outage_codes.get("UNAVAILABLE", 0) > 0
    assert [info.seq for info in infos] == [STEPS] * SESSIONS
    np.testing.assert_allclose(outputs, cached_reference(model_repo, "lstm", xs), atol=1e-5)
    print(
        f"redis restart: {SESSIONS} sessions x {STEPS} steps; {sum(codes.values())} UNAVAILABLE "
        f"({outage_codes.get('UNAVAILABLE', 0)} while down), slowest failed call "
        f"{slowest_failure:.2f} s (deadline {DEADLINE_S} s), {stalled} steps committed before "
        f"the restart, {replayed} replayed; every session at seq {STEPS}, outputs = reference"
    )
