"""Backpressure: far more concurrent steps than the queue bound.

The store (a private redis-server) is frozen with SIGSTOP while a burst of steps
arrives, so every step the server accepts is stuck behind the stalled store. The excess
must still be answered, RESOURCE_EXHAUSTED and nothing applied, while the store is
frozen: refusals never wait for a batch or the store. After SIGCONT the accepted
steps are served and applied once, and memory stays bounded over repeated bursts.
The server-side duration of refusals (the `code` label of the duration histogram) is
reported next to the burst's figures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from prometheus_client import REGISTRY

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import encode_tensor
from tests.models import FEATURES, write_repository
from tests.redis_servers import RedisProcess
from tests.reliability._procs import rss_bytes
from tests.servers import ServerThread

QUEUE_BOUND = 8
MAX_BATCH = 2
BURST = 256
ROUNDS = 3
STEP = "/rnnserve.v1.Recurrent/Step"


def _duration(code: str) -> tuple[float, float]:
    """(count, sum) of the server's Step duration histogram for `code`."""
    labels = {"method": STEP, "model": "lstm", "code": code}
    count = REGISTRY.get_sample_value("rnnserve_request_duration_seconds_count", labels)
    total = REGISTRY.get_sample_value("rnnserve_request_duration_seconds_sum", labels)
    return count or 0.0, total or 0.0


def _slowest_bucket(code: str, count: float) -> float:
    """The smallest bound of the server's Step duration histogram that holds all `count`
    calls of `code` so far (the bounds are the histogram's own)."""
    bounds = []
    for metric in REGISTRY.collect():
        if metric.name != "rnnserve_request_duration_seconds":
            continue
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_bucket")
                and labels.get("method") == STEP
                and labels.get("model") == "lstm"
                and labels.get("code") == code
                and sample.value >= count
            ):
                bounds.append(float(labels["le"]))
    return min(bounds, default=float("inf"))


async def test_excess_is_refused_while_the_store_is_stalled(tmp_path: Path) -> None:
    store = RedisProcess(tmp_path / "redis")
    store.start()
    repo = write_repository(tmp_path / "models", max_batch_size=MAX_BATCH)
    settings = Settings(
        model_repository=repo, port=0, host="127.0.0.1", warmup=False,
        max_queue_size=QUEUE_BOUND, redis_url=store.url,
        redis_timeout_s=60,  # the frozen store must stall the batch, not fail it
    )  # fmt: skip
    assert store.process is not None
    refused_before = _duration("RESOURCE_EXHAUSTED")
    served = refused = 0
    held_per_round: list[int] = []
    rss: list[int] = []
    x = encode_tensor("x", np.ones(FEATURES, "float32"))
    try:
        with ServerThread(settings) as server:
            runner = server.server.engine.runner("lstm")
            batcher = runner.batcher
            most_held = QUEUE_BOUND + runner.config.max_batches_in_flight * MAX_BATCH
            async with aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.RecurrentStub(channel)
                for round_ in range(ROUNDS):
                    ids = [f"b{round_}-{i}" for i in range(BURST)]
                    await asyncio.gather(
                        *(stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=s))
                          for s in ids)
                    )  # fmt: skip

                    async def one(session: str) -> bool:
                        try:
                            request = pb.StepRequest(model="lstm", session_id=session, inputs=[x])
                            await stub.Step(request, timeout=120)
                        except aio.AioRpcError as exc:
                            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                            assert f"(max_queue_size {QUEUE_BOUND})" in exc.details()
                            return False
                        return True

                    store.process.send_signal(signal.SIGSTOP)
                    try:
                        calls = [asyncio.create_task(one(s)) for s in ids]
                        # Every call is either answered (only a refusal can be: the store
                        # is frozen) or held by the batcher (queued or in a stalled batch).
                        deadline = time.monotonic() + 60
                        while sum(c.done() for c in calls) + batcher.active_keys < BURST:
                            assert time.monotonic() < deadline, (
                                f"{sum(c.done() for c in calls)} answered and "
                                f"{batcher.active_keys} held of {BURST} after 60 s"
                            )
                            await asyncio.sleep(0.005)
                        answered = [c for c in calls if c.done()]
                        held = batcher.active_keys
                        assert not any(c.result() for c in answered), (
                            "served while the store was frozen"
                        )
                        assert QUEUE_BOUND < held <= most_held
                    finally:
                        store.process.send_signal(signal.SIGCONT)
                    outcomes = await asyncio.gather(*calls)
                    assert sum(outcomes) == held  # every held step served, the rest refused
                    held_per_round.append(held)
                    served += held
                    refused += BURST - held
                    seqs = await asyncio.gather(
                        *(stub.GetSession(pb.SessionRef(model="lstm", session_id=s)) for s in ids)
                    )
                    # Served steps applied once; refused ones not at all.
                    assert [info.seq for info in seqs] == [int(ok) for ok in outcomes]
                    for session in ids:
                        await stub.EndSession(pb.SessionRef(model="lstm", session_id=session))
                    rss.append(rss_bytes(os.getpid()))
                assert batcher.queued == 0 and batcher.active_keys == 0
    finally:
        store.kill()
    count, total = (
        a - b for a, b in zip(_duration("RESOURCE_EXHAUSTED"), refused_before, strict=True)
    )
    assert count == refused
    print(
        f"backpressure: {ROUNDS} bursts of {BURST} concurrent steps, queue bound {QUEUE_BOUND}, "
        f"store frozen: held {held_per_round}, {served} served after it, {refused} "
        f"RESOURCE_EXHAUSTED while it lasted; refusals server-side: mean "
        f"{total / count * 1000:.2f} ms, all under {_slowest_bucket('RESOURCE_EXHAUSTED', count) * 1000:g} ms "
        f"(cumulative over the process); test-process RSS per burst (MiB): "
        f"{[round(r / 2**20) for r in rss]}"
    )
