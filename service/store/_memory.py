"""`MemoryStore`: records in a dict, for one process (the embedded default)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ._base import Commit

_SWEEP_EVERY = 4096


class MemoryStore:
    """Same semantics as `RedisStore` (compare-and-set, idle expiry), in this process.

    Expiry is checked when a key is read and swept every few thousand writes.
    `clock` is a monotonic seconds function (tests pass a fake one).
    """

    #: Replicas a write must reach before it is acknowledged: none in this process.
    min_replicas_ack = 0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._writes = 0

    def __len__(self) -> int:
        self._sweep()
        return len(self._data)

    def _live(self, key: str, now: float) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._data[key]
            return None
        return entry[0]

    def _wrote(self, count: int) -> None:
        self._writes += count
        if self._writes >= _SWEEP_EVERY:
            self._writes = 0
            self._sweep()

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expiry) in self._data.items() if expiry <= now]:
            del self._data[key]

    async def ping(self) -> None:
        return None  # in this process: it always answers

    async def load_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        return [self._live(key, now) for key in keys]

    async def commit_many(self, commits: Sequence[Commit]) -> list[bool]:
        now = self._clock()
        applied = []
        for commit in commits:
            current = self._live(commit.key, now)
            at = commit.token_at
            ok = current is not None and current[at : at + len(commit.token)] == commit.token
            if ok:
                self._data[commit.key] = (commit.value, now + commit.ttl_s)
            applied.append(ok)
        self._wrote(len(commits))
        return applied

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        now = self._clock()
        if only_if_absent and self._live(key, now) is not None:
            return False
        self._data[key] = (value, now + ttl_s)
        self._wrote(1)
        return True

    async def get(self, key: str) -> bytes | None:
        return self._live(key, self._clock())

    async def delete(self, key: str) -> bool:
        existed = self._live(key, self._clock()) is not None
        self._data.pop(key, None)
        return existed

    async def ttl(self, key: str) -> float | None:
        now = self._clock()
        if self._live(key, now) is None:
            return None
        return self._data[key][1] - now

    async def aclose(self) -> None:
        """Nothing to release; the records stay (engines may share one store)."""
