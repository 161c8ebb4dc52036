"""`RedisStore`: session records in Redis (redis-py asyncio + hiredis).

Per batch: one `MGET` to load every session's record and one `EVALSHA` of
`COMMIT_SCRIPT` to compare-and-set all of them. A Lua script runs atomically, so a
batch's commit lands whole or not at all; if its reply is lost (timeout, connection
reset) the caller cannot tell which, and reports `StoreUnavailable` (the engine
detects its own commit on the next load by the stored request id).

Sentinel (`from_sentinel`): the same store over a pool whose connections go to the
master that a majority of the Sentinels agree on (`_sentinel.AgreedSentinel`); after
a failover, broken connections reconnect to the new master.

Durability (`min_replicas_ack=N`): Redis replicates asynchronously, so a write the
master acknowledged can vanish when a replica is promoted. With N > 0 every write is
followed by `WAIT N timeout` in the same round trip (a pipeline on one connection),
and is acknowledged only when N replicas confirmed it; otherwise it raises
`StoreUnavailable` naming the shortfall (the write may have landed on the master: a
retry with the same seq and request id is then a replay, itself re-written and
waited for by the runner).

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
from ._redis_common import (
    UNAVAILABLE_ERRORS,
    acked_reply,
    check_ack_settings,
    commit_args,
    ttl_ms,
)
from ._sentinel import sentinel_client

logger = logging.getLogger(__name__)

# KEYS[i]: a session key; ARGV[5i-4], ARGV[5i-3]: the first and last byte of the CAS
# token in the stored value, ARGV[5i-2]: the token it must hold there, ARGV[5i-1]: the
# new value, ARGV[5i]: its TTL in milliseconds (`commit_args`). Returns one 1
# (written) or 0 (token differs or key gone) per key.
COMMIT_SCRIPT = """
local applied = {}
for i = 1, #KEYS do
  local base = 5 * i
  if redis.call('GETRANGE', KEYS[i], ARGV[base - 4], ARGV[base - 3]) == ARGV[base - 2] then
    redis.call('SET', KEYS[i], ARGV[base - 1], 'PX', ARGV[base])
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""


class RedisStore:
    """The `StateStore` over one Redis (standalone or behind Sentinel).

    Give it a client or use `from_url` / `from_sentinel`, which set short socket
    timeouts and a single immediate retry: enough to replace a pooled connection that
    died with a restarted server, never long enough to hang a request while Redis is
    down. `op_timeout_s` bounds every call on top of the socket timeouts.
    `min_replicas_ack` / `replicas_ack_timeout_ms`: see the module's "Durability".
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        op_timeout_s: float = 5.0,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 250,
        closing: Sequence[Any] = (),
    ) -> None:
        check_ack_settings(min_replicas_ack, replicas_ack_timeout_ms)
        self._client = client
        self._op_timeout_s = op_timeout_s
        self._script = client.register_script(COMMIT_SCRIPT)
        self.min_replicas_ack = min_replicas_ack
        self.replicas_ack_timeout_ms = replicas_ack_timeout_ms
        self._closing = list(closing)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 5.0,
        max_connections: int = 64,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 250,
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
        return cls(
            client,
            op_timeout_s=op_timeout_s,
            min_replicas_ack=min_replicas_ack,
            replicas_ack_timeout_ms=replicas_ack_timeout_ms,
        )

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service: str,
        *,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 5.0,
        max_connections: int = 64,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 250,
        **kwargs: Any,
    ) -> RedisStore:
        """The master of `service`, as a majority of `sentinels` (host, port) name it."""
        client, sentinel = sentinel_client(
            sentinels,
            service,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
            pool_timeout_s=op_timeout_s,
            max_connections=max_connections,
            **kwargs,
        )
        return cls(
            client,
            op_timeout_s=op_timeout_s,
            min_replicas_ack=min_replicas_ack,
            replicas_ack_timeout_ms=replicas_ack_timeout_ms,
            closing=[s for s in sentinel.sentinels],
        )

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                yield
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
        except rexc.RedisError as exc:
            raise Internal(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc

    async def _durably(self, what: str, *command: Any) -> Any:
        """`command` then `WAIT min_replicas_ack timeout`, pipelined on one connection
        (one round trip); the command's reply, or `StoreUnavailable` when fewer
        replicas confirmed it in time. Call inside `_call`."""
        pipe = self._client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", self.min_replicas_ack, self.replicas_ack_timeout_ms)
        reply, acked = await pipe.execute(raise_on_error=False)
        return acked_reply(what, reply, acked, self.min_replicas_ack, self.replicas_ack_timeout_ms)

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
            args += commit_args(c)
        async with self._call("commit script"):
            if self.min_replicas_ack:
                result = await self._durable_script(keys, args)
            else:
                result = await self._script(keys=keys, args=args)
        return [bool(flag) for flag in result]

    async def _durable_script(self, keys: list[str], args: list[bytes | int]) -> Any:
        if not self._script.sha:
            self._script.sha = await self._client.script_load(COMMIT_SCRIPT)
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        try:
            return await self._durably("commit", *command)
        except rexc.NoScriptError:  # a new master (failover) or a restarted Redis
            self._script.sha = await self._client.script_load(COMMIT_SCRIPT)
            return await self._durably("commit", *command)

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        px = ttl_ms(ttl_s)
        async with self._call("SET"):
            if self.min_replicas_ack:
                nx = ("NX",) if only_if_absent else ()
                done = await self._durably("SET", "SET", key, value, "PX", px, *nx)
            else:
                done = await self._client.set(key, value, px=px, nx=only_if_absent)
        return bool(done)

    async def get(self, key: str) -> bytes | None:
        async with self._call("GET"):
            value = await self._client.get(key)
        return cast(bytes | None, value)

    async def delete(self, key: str) -> bool:
        async with self._call("DEL"):
            if self.min_replicas_ack:
                removed = await self._durably("DEL", "DEL", key)
            else:
                removed = await self._client.delete(key)
        return bool(removed)

    async def ttl(self, key: str) -> float | None:
        async with self._call("PTTL"):
            ms = await self._client.pttl(key)
        return None if ms < 0 else ms / 1000.0

    async def aclose(self) -> None:
        for client in [self._client, *self._closing]:
            try:
                await client.aclose()
            except UNAVAILABLE_ERRORS:  # closing a pool whose server is gone
                logger.debug("closing redis client", exc_info=True)
