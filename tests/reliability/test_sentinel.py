"""Redis behind Sentinel loses its master under load: what rnnserve acknowledged and lost.

Each test starts its own master, two replicas and three Sentinels (quorum 2,
down-after 1 s) on loopback ports, one rnnserve server with `--redis-sentinel`, and
64 sessions of the counting model stepping 16 times each (`_failover.py`).

On loopback a replica receives every write within microseconds, so killing the
master alone loses nothing. To make a loss possible, as a slow network or a busy
replica would, the replicas are frozen (SIGSTOP) and their links on the master cut
(`CLIENT KILL TYPE replica`) for 0.5 s of load before the master is SIGKILLed; then
they resume and the Sentinels promote one.

- `redis_min_replicas_ack=0`: the writes of those 0.5 s were acknowledged and are
  gone. Each one is found: the session's next step gets `SessionRolledBack` naming
  the missing steps (none is applied on the older state, none unnoticed).
- `redis_min_replicas_ack=1`: those writes were never acknowledged (WAIT timed out:
  UNAVAILABLE, retried): nothing acknowledged is lost.
- The master frozen (SIGSTOP) for 3 s, longer than the store timeout and than the
  Sentinels' down-after, then resumed: a failover happens while it is frozen and it
  comes back believing it is the master. No step is applied twice and none
  acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rnnserve.service.settings import Settings
from tests.redis_servers import SentinelGroup
from tests.reliability._failover import Figures, drive, start_sessions, write_counter_repository
from tests.servers import ServerThread

pytestmark = pytest.mark.slow

SESSIONS = 64
STEPS = 16
FAULT_AFTER = SESSIONS * 4  # steps acknowledged before the fault


def _settings(repo: Path, group: SentinelGroup, acks: int) -> Settings:
    return Settings(
        model_repository=repo, port=0, host="127.0.0.1", warmup=False,
        redis_sentinel=group.addresses, redis_service=group.service,
        redis_min_replicas_ack=acks, redis_timeout_s=0.5, health_check_s=0.5,
    )  # fmt: skip


async def _run(tmp_path: Path, acks: int, fault: str) -> tuple[Figures, dict[str, float]]:
    repo = write_counter_repository(tmp_path / "models")
    times: dict[str, float] = {}
    with SentinelGroup(tmp_path / "redis") as group:
        old = group.master

        def lose_unreplicated() -> None:
            for replica in group.replicas:
                replica.stop()
            client = old.client()
            client.client_kill_filter(_type="replica")
            client.close()
            time.sleep(0.5)
            old.kill()
            times["killed"] = time.monotonic()
            for replica in group.replicas:
                replica.cont()
            port = group.wait_agreed_change(old.port)
            times["new master"] = time.monotonic() - times["killed"]
            assert port != old.port

        def freeze() -> None:
            old.stop()
            times["killed"] = time.monotonic()
            time.sleep(3.0)
            old.cont()
            port = group.wait_agreed_change(old.port)
            times["new master"] = time.monotonic() - times["killed"]
            assert port != old.port

        async def run_fault() -> None:
            action = lose_unreplicated if fault == "kill" else freeze
            await asyncio.get_running_loop().run_in_executor(None, action)

        with ServerThread(_settings(repo, group, acks)) as server:
            ids = [f"s{i}" for i in range(SESSIONS)]
            await start_sessions(server.address, ids)
            figures = await drive(
                server.address, ids, STEPS, fault=run_fault, fault_after=FAULT_AFTER
            )
    if figures.last_error_at is not None:
        times["to steps again"] = figures.last_error_at - times["killed"]
    return figures, times


def _report(name: str, figures: Figures, times: dict[str, float]) -> None:
    recovery = ", ".join(f"{k} {v:.2f} s" for k, v in times.items() if k != "killed")
    print(f"\n{figures.line(name)}; {recovery}")


async def test_sentinel_failover_without_replica_acks(tmp_path: Path) -> None:
    figures, times = await _run(tmp_path, 0, "kill")
    _report("sentinel, master SIGKILLed, redis_min_replicas_ack=0", figures, times)
    assert figures.duplicated == 0
    # Every lost step was named to its client; none applied on the older state.
    assert figures.unnoticed == 0
    # ... and applied again: every step acknowledged once, plus once more if lost.
    # (a step lost after its session's last one is named by the next, not applied again)
    lost_and_applied_again = figures.lost - figures.lost_after_end
    assert figures.acknowledged + figures.resynced == figures.stepped + lost_and_applied_again


async def test_sentinel_failover_with_one_replica_ack(tmp_path: Path) -> None:
    figures, times = await _run(tmp_path, 1, "kill")
    _report("sentinel, master SIGKILLed, redis_min_replicas_ack=1", figures, times)
    assert figures.acknowledged == figures.stepped >= SESSIONS * STEPS
    assert (figures.lost, figures.rolled_back, figures.duplicated) == (0, 0, 0)
    assert figures.unavailable > 0  # the fault was felt, and retried


async def test_master_frozen_longer_than_the_timeout(tmp_path: Path) -> None:
    figures, times = await _run(tmp_path, 1, "freeze")
    _report("sentinel, master SIGSTOPped 3 s, redis_min_replicas_ack=1", figures, times)
    assert figures.acknowledged == figures.stepped >= SESSIONS * STEPS
    assert (figures.lost, figures.rolled_back, figures.duplicated) == (0, 0, 0)
    assert figures.unavailable > 0
