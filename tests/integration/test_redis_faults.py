"""A private redis-server: killed and restarted mid-run; round trips per batch counted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from _models import FEATURES, offline_run

from rnnserve.service.engine import RunnerConfig, SessionEngine
from rnnserve.service.errors import StoreUnavailable
from rnnserve.service.store import RedisStore
from tests.redis_servers import RedisProcess

ATOL = 1e-5
HANG_DEADLINE_S = 10.0  # no call may take longer than this, outage or not


@pytest.mark.slow
async def test_redis_killed_and_restarted_mid_run(redis_server: RedisProcess, lstm) -> None:
    """Steps during the outage fail with StoreUnavailable (none hang); clients retry
    with the same seq + request id; after the restart every session has applied every
    step exactly once: outputs and states equal the offline reference."""
    _, step = lstm
    n_sessions, length = 16, 40
    xs = np.random.default_rng(9).standard_normal((n_sessions, length, FEATURES)).astype("float32")
    store = RedisStore.from_url(
        redis_server.url, socket_timeout_s=1.0, connect_timeout_s=0.5, op_timeout_s=2.0
    )
    engine = SessionEngine(store, namespace="restart")
    engine.load_model("lstm", "1", step, config=RunnerConfig(max_queue_delay_s=0.002))
    outputs = np.zeros((n_sessions, length, 4), dtype="float32")
    progress = [0] * n_sessions
    unavailable: list[StoreUnavailable] = []
    outage = asyncio.Event()
    warmed_up = asyncio.Event()  # every session a quarter of the way through
    during_outage: list[StoreUnavailable] = []

    async def client(i: int) -> None:
        t = 0
        while t < length:
            try:
                result = await asyncio.wait_for(
                    engine.step("lstm", f"s{i}", [xs[i, t]], seq=t, request_id=f"s{i}-{t}"),
                    HANG_DEADLINE_S,
                )
            except StoreUnavailable as exc:
                unavailable.append(exc)
                if outage.is_set():
                    during_outage.append(exc)
                await asyncio.sleep(0.05)
                continue
            assert result.seq == t + 1
            outputs[i, t] = result.outputs[0]
            t += 1
            progress[i] = t
            if sum(progress) >= n_sessions * 10:
                warmed_up.set()
            await asyncio.sleep(0.002)

    async with engine:
        for i in range(n_sessions):
            await engine.start("lstm", f"s{i}")
        clients = asyncio.gather(*(client(i) for i in range(n_sessions)))
        await asyncio.wait_for(warmed_up.wait(), 60)
        await asyncio.to_thread(redis_server.kill)
        outage.set()
        await asyncio.sleep(1.0)
        outage.clear()
        stalled = list(progress)
        await asyncio.to_thread(redis_server.start)
        await asyncio.wait_for(clients, 120)
        print(
            "unavailable:",
            len(unavailable),
            "during outage:",
            len(during_outage),
            "stalled at",
            sum(stalled),
        )
        assert during_outage, "no step failed while Redis was down"
        assert all("redis" in str(exc) for exc in unavailable)
        assert sum(stalled) < n_sessions * length  # the outage really was mid-run
        for i in range(n_sessions):
            want_out, want_states = offline_run(step, xs[i])
            np.testing.assert_allclose(outputs[i], want_out, atol=ATOL)
            record = await engine.export_state("lstm", f"s{i}")
            assert record.seq == length
            for got, want in zip(record.states, want_states, strict=True):
                np.testing.assert_allclose(got, want, atol=ATOL)


async def test_store_calls_fail_fast_while_redis_is_down(redis_server: RedisProcess) -> None:
    store = RedisStore.from_url(redis_server.url, connect_timeout_s=0.5, op_timeout_s=2.0)
    await store.ping()
    redis_server.kill()
    for call in (store.load_many(["a"]), store.get("a"), store.put("a", b"x", 1)):
        with pytest.raises(StoreUnavailable, match="redis"):
            await asyncio.wait_for(call, HANG_DEADLINE_S)
    await asyncio.to_thread(redis_server.start)
    assert await asyncio.wait_for(store.load_many(["a"]), HANG_DEADLINE_S) == [None]
    await store.aclose()


async def test_at_most_two_redis_calls_per_batch(redis_server: RedisProcess, lstm) -> None:
    """INFO commandstats on a private server: a batch of 256 sessions costs one MGET
    and one EVALSHA (the GETRANGE/SET calls counted inside the script are not round trips)."""
    _, step = lstm
    sessions, rounds = 256, 4
    store = RedisStore.from_url(redis_server.url)
    await store.ping()  # loads the script, so batches never need SCRIPT LOAD
    engine = SessionEngine(store, namespace="trips")
    runner = engine.load_model(
        "lstm", "1", step, config=RunnerConfig(max_batch_size=256, max_queue_delay_s=0.5)
    )
    x = np.zeros(FEATURES, dtype="float32")
    admin = redis_server.client()
    async with engine:
        for i in range(sessions):
            await engine.start("lstm", f"s{i}")
        admin.config_resetstat()
        for _ in range(rounds):
            results = await asyncio.gather(
                *(engine.step("lstm", f"s{i}", [x]) for i in range(sessions))
            )
            assert {r.seq for r in results} == {results[0].seq}
        stats = admin.info("commandstats")
    admin.close()
    calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
    print("commandstats:", calls)
    assert runner.batcher.stats.size_counts == {256: rounds}
    batches = runner.batcher.stats.batches
    round_trips = sum(calls.get(c, 0) for c in ("mget", "evalsha", "eval", "script|load", "get"))
    assert calls.get("mget") == batches
    assert calls.get("evalsha") == batches
    assert round_trips / batches <= 2
    # what the script did inside, per session
    assert calls.get("getrange") == sessions * rounds
