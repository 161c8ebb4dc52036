"""Soak: 256 sessions stepping without pause against the Redis store for
`RNNSERVE_SOAK_SECONDS` (default 20 s to keep the suite short; the documented
figures come from 60). Zero errors; the server's asyncio tasks and the process's
file descriptors back to their warm level afterwards; RSS growth bounded."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import numpy as np
import pytest
from grpc import aio

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import encode_tensor
from tests.models import FEATURES
from tests.redis_servers import delete_namespace
from tests.reliability._procs import open_fds, rss_bytes
from tests.servers import ServerThread

SESSIONS = 256
SOAK_S = float(os.environ.get("RNNSERVE_SOAK_SECONDS", "20"))
WARM_S = 3.0
RSS_GROWTH_LIMIT = 128 * 2**20


async def _tasks() -> int:
    return len(asyncio.all_tasks())


@pytest.mark.slow
async def test_soak_256_sessions_on_redis(model_repo, redis_url):
    namespace = f"rel-soak-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        redis_url=redis_url, namespace=namespace,
    )  # fmt: skip
    errors: list[BaseException] = []
    steps = [0] * SESSIONS
    stop = asyncio.Event()
    x = [encode_tensor("x", np.full(FEATURES, i % 7, "float32")) for i in range(SESSIONS)]
    try:
        with ServerThread(settings) as server:
            async with aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.RecurrentStub(channel)
                ids = [f"soak{i}" for i in range(SESSIONS)]
                for session in ids:
                    await stub.StartSession(
                        pb.StartSessionRequest(model="lstm", session_id=session)
                    )

                async def drive(i: int) -> None:
                    while not stop.is_set():
                        request = pb.StepRequest(
                            model="lstm", session_id=ids[i], seq=steps[i],
                            request_id=f"{ids[i]}#{steps[i]}", inputs=[x[i]],
                        )  # fmt: skip
                        try:
                            reply = await stub.Step(request, timeout=60)
                        except Exception as exc:
                            errors.append(exc)
                            return
                        assert reply.seq == steps[i] + 1
                        steps[i] += 1

                async def settle() -> tuple[int, int, int]:
                    await asyncio.sleep(0.5)
                    gc_tasks = await asyncio.to_thread(server.call, _tasks())
                    return gc_tasks, open_fds(os.getpid()), rss_bytes(os.getpid())

                drivers = [asyncio.ensure_future(drive(i)) for i in range(SESSIONS)]
                await asyncio.sleep(WARM_S)
                stop.set()
                await asyncio.gather(*drivers)
                warm_steps = sum(steps)
                tasks0, fds0, rss0 = await settle()
                stop.clear()
                began = time.monotonic()
                drivers = [asyncio.ensure_future(drive(i)) for i in range(SESSIONS)]
                await asyncio.sleep(SOAK_S)
                stop.set()
                await asyncio.gather(*drivers)
                elapsed = time.monotonic() - began
                tasks1, fds1, rss1 = await settle()
                infos = await asyncio.gather(
                    *(stub.GetSession(pb.SessionRef(model="lstm", session_id=s)) for s in ids)
                )
    finally:
        delete_namespace(redis_url, namespace)
    soak_steps = sum(steps) - warm_steps
    assert errors == []
    assert [info.seq for info in infos] == steps  # every acknowledged step applied once
    assert tasks1 <= tasks0
    assert fds1 <= fds0 + 2
    assert rss1 - rss0 < RSS_GROWTH_LIMIT
    print(
        f"soak: {SESSIONS} sessions, {elapsed:.0f} s on Redis: {soak_steps} steps "
        f"({soak_steps / elapsed:.0f}/s), 0 errors; server tasks {tasks0} -> {tasks1}; "
        f"fds {fds0} -> {fds1}; RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB "
        f"(server and client in one process)"
    )
