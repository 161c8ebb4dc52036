"""A Redis Cluster loses one master of three under load: only its sessions notice.

Each test starts three masters with one replica each (`cluster-node-timeout` 1 s),
one rnnserve server with `redis_cluster=True`, and 64 sessions of the counting model
stepping 16 times each (`_failover.py`). One master is SIGKILLed after its replica
was frozen and cut off for 0.5 s of load (as in `test_sentinel.py`: on loopback a
replica otherwise has every write at once); the replica resumes and takes over; then the old master is started again (as a
restarted pod would be) and rejoins as the new master's replica.

A batch holds sessions of every shard: the dead node fails only its own keys
(`PartialStoreFailure`), so the sessions of the two other shards see no error at
all, with or without the durability setting. That needs the cluster to keep serving
the slots it still covers: `cluster-require-full-coverage no` (with the default
`yes`, every node refuses every command from the moment the master is marked failed
until its replica takes over, and all sessions see UNAVAILABLE for that second). With `redis_min_replicas_ack=1` the
killed shard loses nothing acknowledged; without it, its lost steps are each named
by `SessionRolledBack`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from rnnserve.service.settings import Settings
from tests.redis_servers import RedisProcess, redis_cluster
from tests.reliability._failover import Figures, drive, start_sessions, write_counter_repository
from tests.servers import ServerThread

pytestmark = pytest.mark.slow

SESSIONS = 64
STEPS = 16
NAMESPACE = "failover"


def _slots_of(node: RedisProcess) -> list[tuple[int, int]]:
    client = node.client()
    try:
        text = client.execute_command("CLUSTER", "NODES", NEVER_DECODE=True)
    finally:
        client.close()
    if isinstance(text, bytes):
        text = text.decode()
    for line in str(text).splitlines():
        fields = line.split()
        if "myself" in fields[2]:  # id addr flags master ping pong epoch link slots...
            ranges = [r.split("-") for r in fields[8:] if not r.startswith("[")]
            return [(int(r[0]), int(r[-1])) for r in ranges]
    raise RuntimeError(f"CLUSTER NODES of {node.port} names no myself")


def _replica_of(master: RedisProcess, nodes: list[RedisProcess]) -> RedisProcess:
    client = master.client()
    try:
        port = int(client.info("replication")["slave0"]["port"])
    finally:
        client.close()
    return next(n for n in nodes if n.port == port)


def _wait_promoted(replica: RedisProcess, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    client = replica.client()
    try:
        while True:
            try:
                if (
                    client.info("replication")["role"] == "master"
                    and client.cluster("info")["cluster_state"] == "ok"
                ):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not take over")
            time.sleep(0.05)
    finally:
        client.close()


async def _run(tmp_path: Path, acks: int) -> tuple[Figures, list[bool], dict[str, float]]:
    repo = write_counter_repository(tmp_path / "models")
    ids = [f"s{i}" for i in range(SESSIONS)]
    times: dict[str, float] = {}
    with redis_cluster(
        tmp_path / "cluster", replicas=1, node_timeout_ms=1000,
        extra=("--cluster-require-full-coverage", "no"),
    ) as nodes:  # fmt: skip
        victim = nodes[0]
        replica = _replica_of(victim, nodes)
        slots = _slots_of(victim)

        def on_victim(session: str) -> bool:
            slot = key_slot(f"rnnserve:{NAMESPACE}:count:{session}".encode())
            return any(a <= slot <= b for a, b in slots)

        def kill() -> None:
            replica.stop()
            client = victim.client()
            client.client_kill_filter(_type="replica")
            client.close()
            time.sleep(0.5)
            victim.kill()
            times["killed"] = time.monotonic()
            replica.cont()
            _wait_promoted(replica)
            times["replica promoted"] = time.monotonic() - times["killed"]
            # As a restarted pod would: the old master rejoins, as the new one's replica
            # (without one, that shard could never again satisfy redis_min_replicas_ack=1).
            victim.start()

        async def fault() -> None:
            await asyncio.get_running_loop().run_in_executor(None, kill)

        settings = Settings(
            model_repository=repo, port=0, host="127.0.0.1", warmup=False,
            redis_url=nodes[1].url, redis_cluster=True, namespace=NAMESPACE,
            redis_min_replicas_ack=acks, redis_timeout_s=0.5, health_check_s=0.5,
        )  # fmt: skip
        with ServerThread(settings) as server:
            await start_sessions(server.address, ids)
            figures = await drive(server.address, ids, STEPS, fault=fault, fault_after=SESSIONS * 4)
    if figures.last_error_at is not None:
        times["to steps again"] = figures.last_error_at - times["killed"]
    return figures, [on_victim(s) for s in ids], times


def _report(name: str, figures: Figures, victims: list[bool], times: dict[str, float]) -> int:
    others = sum(e for e, v in zip(figures.errors_by_session, victims, strict=True) if not v)
    recovery = ", ".join(f"{k} {v:.2f} s" for k, v in times.items() if k != "killed")
    print(
        f"\n{figures.line(name)}; {sum(victims)} sessions on the killed shard; "
        f"errors seen by the {victims.count(False)} sessions of the other shards: {others}; "
        f"{recovery}"
    )
    return others


async def test_cluster_master_killed_without_replica_acks(tmp_path: Path) -> None:
    figures, victims, times = await _run(tmp_path, 0)
    others = _report(
        "cluster, one master SIGKILLed, redis_min_replicas_ack=0", figures, victims, times
    )
    assert 0 < sum(victims) < SESSIONS
    assert others == 0
    assert figures.duplicated == 0 and figures.unnoticed == 0
    # (a step lost after its session's last one is named by the next, not applied again)
    lost_and_applied_again = figures.lost - figures.lost_after_end
    assert figures.acknowledged + figures.resynced == figures.stepped + lost_and_applied_again


async def test_cluster_master_killed_with_one_replica_ack(tmp_path: Path) -> None:
    figures, victims, times = await _run(tmp_path, 1)
    others = _report(
        "cluster, one master SIGKILLed, redis_min_replicas_ack=1", figures, victims, times
    )
    assert 0 < sum(victims) < SESSIONS
    assert others == 0
    assert figures.acknowledged == figures.stepped >= SESSIONS * STEPS
    assert (figures.lost, figures.rolled_back, figures.duplicated) == (0, 0, 0)
