"""Scale-out on a Redis Cluster: three masters started here on loopback ports
(`redis-server --cluster-enabled yes` x3 + `redis-cli --cluster create`), two rnnserve
replicas with `redis_cluster=True`, 64 sessions whose steps alternate between them.

Correctness: every output equals the offline reference, every session ends at its
step count. Round trips: per batch, each node receives at most one load script and
one commit script (`EVALSHA`), counted by INFO commandstats on each node against the
batches the two replicas ran."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from grpc import aio

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.errors import PartialStoreFailure, StoreUnavailable
from rnnserve.service.record import CAS_TOKEN_OFFSET, CAS_TOKEN_SLICE, cas_token
from rnnserve.service.settings import Settings
from rnnserve.service.store import Commit, RedisClusterStore
from rnnserve.service.wire import decode_tensor, encode_tensor
from tests.integration._grpc_util import cached_reference
from tests.models import FEATURES
from tests.redis_servers import commandstats, redis_cluster
from tests.servers import ServerThread

SESSIONS = 64
STEPS = 12


def _batches(servers: list[ServerThread]) -> int:
    return sum(s.server.engine.runner("lstm").batcher.stats.batches for s in servers)


@pytest.mark.slow
async def test_two_replicas_on_a_three_master_cluster(model_repo, tmp_path):
    xs = np.random.default_rng(8).normal(size=(SESSIONS, STEPS, FEATURES)).astype("float32")
    outputs = np.zeros((SESSIONS, STEPS, 3), "float32")
    with redis_cluster(tmp_path / "cluster") as nodes:
        settings = Settings(
            model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
            redis_url=nodes[0].url, redis_cluster=True, namespace="cluster",
        )  # fmt: skip
        with ServerThread(settings) as a, ServerThread(settings) as b:
            async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
                stubs = pb_grpc.RecurrentStub(ca), pb_grpc.RecurrentStub(cb)
                ids = [f"c{i}" for i in range(SESSIONS)]
                for i, session in enumerate(ids):
                    await stubs[i % 2].StartSession(
                        pb.StartSessionRequest(model="lstm", session_id=session)
                    )

                async def step(i: int, t: int) -> None:
                    request = pb.StepRequest(
                        model="lstm", session_id=ids[i], seq=t, request_id=f"{ids[i]}#{t}",
                        inputs=[encode_tensor("x", xs[i, t])],
                    )  # fmt: skip
                    reply = await stubs[(i + t) % 2].Step(request, timeout=60)
                    assert reply.seq == t + 1 and not reply.replayed
                    outputs[i, t] = decode_tensor(reply.outputs[0])

                # Step 0 everywhere loads the scripts on every node; then count.
                await asyncio.gather(*(step(i, 0) for i in range(SESSIONS)))
                for node in nodes:
                    node.client().config_resetstat()
                batches_before = _batches([a, b])

                async def drive(i: int) -> None:
                    for t in range(1, STEPS):
                        await step(i, t)

                await asyncio.wait_for(asyncio.gather(*(drive(i) for i in range(SESSIONS))), 300)
                batches = _batches([a, b]) - batches_before
                stats = [commandstats(node.client()) for node in nodes]
                infos = [
                    await stubs[i % 2].GetSession(pb.SessionRef(model="lstm", session_id=s))
                    for i, s in enumerate(ids)
                ]
                keys_per_node = [node.client().dbsize() for node in nodes]

    steps = SESSIONS * (STEPS - 1)
    evalsha = [s.get("evalsha", 0) for s in stats]
    assert [info.seq for info in infos] == [STEPS] * SESSIONS
    np.testing.assert_allclose(outputs, cached_reference(model_repo, "lstm", xs), atol=1e-5)
    assert all(keys > 0 for keys in keys_per_node)  # the sessions really are spread out
    # Every batch applies steps: one load + one commit on each node it touches, no more.
    for calls in evalsha:
        assert calls <= 2 * batches
    assert 2 * batches <= sum(evalsha) <= 2 * batches * len(nodes)
    for s in stats:  # nothing else reads or writes records outside the scripts
        assert s.get("mget", 0) == 0 and s.get("eval", 0) == 0
    print(
        f"cluster: {steps} steps in {batches} batches over 2 replicas; EVALSHA per node "
        f"{evalsha} (bound 2 x batches = {2 * batches}); keys per node {keys_per_node}; "
        f"{steps / max(1, sum(evalsha) / 2):.1f} steps per (load, commit) pair"
    )


@pytest.mark.slow
async def test_a_dead_node_fails_only_its_keys_and_a_stale_slot_map_is_unavailable(tmp_path):
    """Store level, three masters without replicas: with one node killed, a load or
    commit spanning all three fails only the dead node's keys (`PartialStoreFailure`
    with the others' answers); a slot map that points a key at the wrong node (as
    after a failover or resharding) is UNAVAILABLE, not INTERNAL, and is refreshed."""
    with redis_cluster(tmp_path / "cluster") as nodes:
        store = RedisClusterStore.from_url(nodes[0].url, socket_timeout_s=0.5, op_timeout_s=1.5)
        try:
            keys = [f"rnnserve:partial:m:{i}" for i in range(30)]
            record = bytes(8) + cas_token(0, 0) + b"state"
            for key in keys:
                await store.put(key, record, 60)
            manager = store.client.nodes_manager
            owner = {k: manager.get_node_from_slot(store.client.keyslot(k)).port for k in keys}

            # A stale slot map: key 0 is sent to a node that does not own its slot.
            slot = store.client.keyslot(keys[0])
            wrong = next(n for n in manager.nodes_cache.values() if n.port != owner[keys[0]])
            saved = manager.slots_cache[slot]
            manager.slots_cache[slot] = [wrong]
            with pytest.raises(StoreUnavailable, match="non local key"):
                await store.load_many([keys[0]])
            for _ in range(50):  # the refresh runs in the background
                if manager.slots_cache[slot][0].port == owner[keys[0]]:
                    break
                await asyncio.sleep(0.05)
            assert manager.slots_cache[slot][0].port == saved[0].port
            assert await store.load_many([keys[0]]) == [record]

            dead = nodes[2]
            dead.kill()
            on_dead = {i for i, k in enumerate(keys) if owner[k] == dead.port}
            assert 0 < len(on_dead) < len(keys)
            with pytest.raises(PartialStoreFailure) as info:
                await store.load_many(keys)
            assert set(info.value.failed) == on_dead
            assert all(isinstance(e, StoreUnavailable) for e in info.value.failed.values())
            assert [info.value.results[i] for i in range(len(keys)) if i not in on_dead] == [
                record
            ] * (len(keys) - len(on_dead))
            commits = [
                Commit(k, record[CAS_TOKEN_SLICE], record, 60, CAS_TOKEN_OFFSET) for k in keys
            ]
            with pytest.raises(PartialStoreFailure) as info:
                await store.commit_many(commits)
            assert set(info.value.failed) == on_dead
            assert all(info.value.results[i] for i in range(len(keys)) if i not in on_dead)
            # Keys of the dead node only: the whole call fails, as on one Redis.
            with pytest.raises(StoreUnavailable) as only_dead:
                await store.load_many([keys[i] for i in sorted(on_dead)])
            assert not isinstance(only_dead.value, PartialStoreFailure)
        finally:
            await store.aclose()
