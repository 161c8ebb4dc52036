"""`min_replicas_ack`: a write is acknowledged only once a replica has it.

A private master and one replica (started here). With `min_replicas_ack=1`:

- every acknowledged step's record is already on the replica when the step returns;
- with the replica frozen (SIGSTOP), a step fails UNAVAILABLE naming the shortfall;
  it did land on the master, so once the replica is back the same step (same seq,
  same request id) is a replay, and the replay itself is re-written and waited for
  (the record the replay answered from is on the replica too);
- start and end wait as well; asking for more replicas than there are fails them all.

Plus the latency each commit pays for it (a 64-record commit, N=0 against N=1 on the
same pair of servers), printed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnserve.core import StepFunction, from_keras
from rnnserve.service.engine import RunnerConfig, SessionEngine
from rnnserve.service.errors import StoreUnavailable
from rnnserve.service.record import CAS_TOKEN_OFFSET, CAS_TOKEN_SLICE, cas_token, read_header
from rnnserve.service.store import Commit, RedisStore, session_key
from tests.models import FEATURES, lstm_model
from tests.redis_servers import RedisProcess, wait_replicas

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    master = RedisProcess(tmp_path / "master", extra=("--repl-diskless-sync-delay", "0"))
    master.start()
    replica = RedisProcess(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))
    )
    try:
        replica.start()
        wait_replicas(master, 1)
        yield master, replica
    finally:
        replica.cont()
        replica.kill()
        master.kill()


@pytest.fixture(scope="module")
def step_fn() -> StepFunction:
    return StepFunction(from_keras(lstm_model()), max_batch_size=8)


def _engine(master: RedisProcess, acks: int, step_fn: StepFunction) -> SessionEngine:
    store = RedisStore.from_url(
        master.url, socket_timeout_s=1.0, op_timeout_s=2.5,
        min_replicas_ack=acks, replicas_ack_timeout_ms=500,
    )  # fmt: skip
    engine = SessionEngine(store, namespace="acks")
    engine.load_model("lstm", "1", step_fn, config=RunnerConfig(max_queue_delay_s=0.001))
    return engine


def _replica_seq(replica: RedisProcess, session: str) -> int | None:
    client = replica.client()
    try:
        raw = client.get(session_key("acks", "lstm", session))
    finally:
        client.close()
    return None if raw is None else read_header(raw).seq


async def test_acknowledged_means_on_the_replica(pair, step_fn) -> None:
    master, replica = pair
    x = np.zeros(FEATURES, np.float32)
    async with _engine(master, 1, step_fn) as engine:
        await engine.start("lstm", "a")
        assert _replica_seq(replica, "a") == 0
        for t in range(5):
            result = await engine.step("lstm", "a", [x], seq=t, request_id=f"a{t}")
            assert result.seq == t + 1
            assert _replica_seq(replica, "a") == t + 1  # there before the answer came

        replica.stop()
        try:
            with pytest.raises(StoreUnavailable) as info:
                await engine.step("lstm", "a", [x], seq=5, request_id="a5")
            assert (
                "reached 0 of the 1 replica(s) that --redis-min-replicas-ack requires within 500 ms"
                in str(info.value)
            )
            assert "--redis-min-replicas-ack" in str(info.value)
            # Not acknowledged, yet on the master: the retry below must be a replay.
            assert (await engine.get("lstm", "a")).seq == 6
        finally:
            replica.cont()
        wait_replicas(master, 1)
        again = await engine.step("lstm", "a", [x], seq=5, request_id="a5")
        assert (again.seq, again.replayed) == (6, True)
        assert _replica_seq(replica, "a") == 6

        # The replay's re-write is waited for too: with the replica frozen, a replay is
        # UNAVAILABLE, not an acknowledgement of a record only the master has.
        replica.stop()
        try:
            with pytest.raises(StoreUnavailable, match="reached 0 of the 1"):
                await engine.step("lstm", "a", [x], seq=5, request_id="a5")
            with pytest.raises(StoreUnavailable, match="reached 0 of the 1"):
                await engine.end("lstm", "a")
            with pytest.raises(StoreUnavailable, match="reached 0 of the 1"):
                await engine.start("lstm", "b")
        finally:
            replica.cont()


async def test_more_replicas_than_there_are_fail_every_write(pair, step_fn) -> None:
    master, _ = pair
    async with _engine(master, 2, step_fn) as engine:
        with pytest.raises(StoreUnavailable, match="reached 1 of the 2 replica"):
            await engine.start("lstm", "c")


async def test_the_latency_cost_of_one_replica_ack(pair) -> None:
    """One 64-record commit, 200 times, without and with WAIT 1 (printed)."""
    master, _ = pair
    record = bytes(8) + cas_token(0, 0) + bytes(512)
    figures = {}
    for acks in (0, 1):
        store = RedisStore.from_url(master.url, min_replicas_ack=acks, replicas_ack_timeout_ms=500)
        keys = [f"rnnserve:cost:m:{acks}-{i}" for i in range(64)]
        for key in keys:
            await store.put(key, record, 60)
        seconds = []
        for _ in range(20):  # warm the connections and the script
            await store.commit_many(
                [Commit(k, record[CAS_TOKEN_SLICE], record, 60, CAS_TOKEN_OFFSET) for k in keys]
            )
        for _ in range(200):
            started = time.perf_counter()
            applied = await store.commit_many(
                [Commit(k, record[CAS_TOKEN_SLICE], record, 60, CAS_TOKEN_OFFSET) for k in keys]
            )
            seconds.append(time.perf_counter() - started)
            assert all(applied)
        await store.aclose()
        figures[acks] = (np.percentile(seconds, 50) * 1e3, np.percentile(seconds, 99) * 1e3)
    (p50_0, p99_0), (p50_1, p99_1) = figures[0], figures[1]
    print(
        f"\n64-record commit, 200 times: redis_min_replicas_ack=0 p50 {p50_0:.2f} ms "
        f"p99 {p99_0:.2f} ms; =1 p50 {p50_1:.2f} ms p99 {p99_1:.2f} ms "
        f"(+{p50_1 - p50_0:.2f} ms at p50)"
    )
    assert p50_1 < 100  # WAIT answered as soon as the replica acknowledged, not at the timeout
