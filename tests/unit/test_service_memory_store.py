"""MemoryStore expiry on a fake clock (the contract suite covers the rest, with Redis)."""

from __future__ import annotations

from rnnserve.service.record import CAS_TOKEN_OFFSET, SessionRecord
from rnnserve.service.store import Commit, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def raw(seq: int) -> bytes:
    return SessionRecord(model="m", version="1", seq=seq, incarnation=7).encode()


async def test_expiry_is_idle_time_refreshed_by_commits() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.put("k", raw(0), 10)
    clock.now += 9
    assert await store.ttl("k") == 1
    token = SessionRecord(model="m", version="1", seq=0, incarnation=7).cas_token
    assert await store.commit_many([Commit("k", token, raw(1), 10, CAS_TOKEN_OFFSET)]) == [True]
    clock.now += 9  # 18 s after creation, 9 s after the last commit: alive
    assert await store.load_many(["k"]) == [raw(1)]
    clock.now += 1
    assert await store.load_many(["k"]) == [None]
    assert len(store) == 0


async def test_sweep_drops_expired_records_nobody_reads() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for i in range(10):
        await store.put(f"k{i}", raw(0), 1)
    clock.now += 2
    await store.put("fresh", raw(0), 60)
    assert len(store) == 1
