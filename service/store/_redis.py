"""`RedisStore`: session records in Redis (redis-py asyncio + hiredis).

Per batch: one `MGET` to load every session's record and one `EVALSHA` of
`COMMIT_SCRIPT` to compare-and-set all of them. A Lua script runs atomically, so a
batch's commit lands whole or not at all; if its reply is lost (timeout, connection
reset) the caller cannot tell which, and reports `StoreUnavailable` (the engine
detects its own commit on the next load by the stored request id).

Redis Cluster is `RedisClusterStore` (`_cluster.py`): keys grouped by node, one
load script and one commit script call per node per batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import Internal, StoreUnavailable
from ._base import Commit

logger = logging.getLogger(__name__)

# KEYS[i]: a session key; ARGV[3i-2]: the CAS token it must hold (record bytes 8..23,
# seq + incarnation), ARGV[3i-1]: the new record, ARGV[3i]: its TTL in milliseconds.
# Returns one 1 (written) or 0 (token differs or key gone) per key.
COMMIT_SCRIPT = """
local applied = {}
for i = 1, #KEYS do
  local base = 3 * i
  if redis.call('GETRANGE', KEYS[i], 8, 23) == ARGV[base - 2] then
    redis.call('SET', KEYS[i], ARGV[base - 1], 'PX', ARGV[base])
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (Redis still loading its AOF)
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    TimeoutError,
    OSError,
)


class RedisStore:
    """The `StateStore` over one Redis (standalone or behind Sentinel).

    Give it a client or use `from_url`, which sets short socket timeouts and a single
    immediate retry: enough to replace a pooled connection that died with a restarted
    server, never long enough to hang a request while Redis is down. `op_timeout_s`
    bounds every call on top of the socket timeouts.
    """

    def __init__(self, client: aioredis.Redis, *, op_timeout_s: float = 5.0) -> None:
        self._client = client
        self._op_timeout_s = op_timeout_s
        self._script = client.register_script(COMMIT_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 5.0,
        max_connections: int = 64,
        **kwargs: Any,
    ) -> RedisStore:
        # A blocking pool: beyond max_connections concurrent calls wait for a free
        # connection (bounded by op_timeout_s) instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=op_timeout_s,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 1),
            **kwargs,
        )
        client = aioredis.Redis.from_pool(pool)
        return cls(client, op_timeout_s=op_timeout_s)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
        except rexc.RedisError as exc:
            raise Internal(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Check the connection and load the commit script (so batches use EVALSHA only)."""
        async with self._call("PING"):
            await self._client.ping()
            self._script.sha = await self._client.script_load(COMMIT_SCRIPT)

    async def load_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self._call("MGET"):
            values = await self._client.mget(keys)
        return cast(list[bytes | None], values)

    async def commit_many(self, commits: Sequence[Commit]) -> list[bool]:
        if not commits:
            return []
        keys = [c.key for c in commits]
        args: list[bytes | int] = []
        for c in commits:
            args += (c.token, c.value, max(1, int(c.ttl_s * 1000)))
        async with self._call("commit script"):
            result = await self._script(keys=keys, args=args)
        return [bool(flag) for flag in result]

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        async with self._call("SET"):
            done = await self._client.set(
                key, value, px=max(1, int(ttl_s * 1000)), nx=only_if_absent
            )
        return bool(done)

    async def get(self, key: str) -> bytes | None:
        async with self._call("GET"):
            value = await self._client.get(key)
        return cast(bytes | None, value)

    async def delete(self, key: str) -> bool:
        async with self._call("DEL"):
            removed = await self._client.delete(key)
        return bool(removed)

    async def ttl(self, key: str) -> float | None:
        async with self._call("PTTL"):
            ms = await self._client.pttl(key)
        return None if ms < 0 else ms / 1000.0

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except _UNAVAILABLE:  # closing a pool whose server is gone
            logger.debug("closing redis client", exc_info=True)
