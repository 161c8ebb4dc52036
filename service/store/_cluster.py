"""`RedisClusterStore`: session records in a Redis Cluster, one round trip per node.

A batch's keys hash to many slots, and Redis refuses a multi-key command (`MGET`, or
a script's declared `KEYS`) whose keys span slots, even on one node. So the keys
are grouped by the node that owns their slot, and each node gets ONE call per
batch: a read-only script that GETs every key of the group (load) and the
compare-and-set script (commit), both with the `allow-cross-slot-keys` flag (Redis
7+) and the keys passed as arguments, sent to that node directly. The groups run
concurrently, so a batch costs one round trip per node, in parallel.

Each node's commit script is atomic; a batch spread over nodes is not. If one
node fails, the batch raises `StoreUnavailable` although the other nodes' commits
may have landed: a retry with the same `seq` and request id is then replayed from
the stored reply (as for a lost reply on one Redis). A MOVED/ASK reply (slots
migrating, a failover) refreshes the slot map and is `StoreUnavailable` too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import Internal, StoreUnavailable
from ._base import Commit
from ._redis import _UNAVAILABLE

logger = logging.getLogger(__name__)

T = TypeVar("T")

# ARGV: the keys of one node (any slots). Returns their values (nil where absent).
LOAD_SCRIPT = """#!lua flags=no-writes,allow-cross-slot-keys
local values = {}
for i = 1, #ARGV do
  values[i] = redis.call('GET', ARGV[i])
end
return values
"""

# ARGV[4i-3]: a key, ARGV[4i-2]: the CAS token it must hold (record bytes 8..23),
# ARGV[4i-1]: the new record, ARGV[4i]: its TTL in milliseconds. As `COMMIT_SCRIPT`.
CLUSTER_COMMIT_SCRIPT = """#!lua flags=allow-cross-slot-keys
local applied = {}
for i = 1, #ARGV / 4 do
  local base = 4 * i
  local key = ARGV[base - 3]
  if redis.call('GETRANGE', key, 8, 23) == ARGV[base - 2] then
    redis.call('SET', key, ARGV[base - 1], 'PX', ARGV[base])
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""

_TOPOLOGY_CHANGED: tuple[type[BaseException], ...] = (
    rexc.MovedError,
    rexc.AskError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    rexc.SlotNotCoveredError,
    rexc.ClusterError,
    rexc.RedisClusterException,
)


class RedisClusterStore:
    """The `StateStore` over a Redis Cluster (Redis >= 7): keys grouped by node."""

    def __init__(self, client: RedisCluster, *, op_timeout_s: float = 5.0) -> None:
        self._client = client
        self._op_timeout_s = op_timeout_s
        self._load = client.register_script(LOAD_SCRIPT)
        self._commit = client.register_script(CLUSTER_COMMIT_SCRIPT)
        self._refresh: asyncio.Task[None] | None = None

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
    ) -> RedisClusterStore:
        """`url` names any node of the cluster; the others are discovered from it."""
        client = RedisCluster.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1),
            **kwargs,
        )
        return cls(client, op_timeout_s=op_timeout_s)

    @property
    def client(self) -> RedisCluster:
        return self._client

    @asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                yield
        except _TOPOLOGY_CHANGED as exc:
            self._refresh_slots()
            raise StoreUnavailable(
                f"redis cluster {what} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except _UNAVAILABLE as exc:
            self._refresh_slots()
            raise StoreUnavailable(
                f"redis cluster {what} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except rexc.RedisError as exc:
            raise Internal(f"redis cluster {what} failed: {type(exc).__name__}: {exc}") from exc

    def _refresh_slots(self) -> None:
        """Re-read the slot map in the background (once at a time)."""
        if self._refresh is not None and not self._refresh.done():
            return

        async def refresh() -> None:
            try:
                await self._client.nodes_manager.initialize()
            except Exception:  # the next failing call tries again
                logger.debug("refreshing the cluster slot map", exc_info=True)

        self._refresh = asyncio.ensure_future(refresh())

    async def _initialized(self) -> None:
        async with self._call("initialize"):
            await self._client.initialize()

    def _by_node(self, keys: Sequence[str]) -> dict[str, tuple[ClusterNode, list[int]]]:
        """Indices of `keys` grouped by the primary that owns each key's slot."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        manager = self._client.nodes_manager
        for i, key in enumerate(keys):
            node = manager.get_node_from_slot(self._client.keyslot(key))
            groups.setdefault(node.name, (node, []))[1].append(i)
        return groups

    async def _script_on(self, node: ClusterNode, script: Any, args: list[Any]) -> Any:
        """EVALSHA on `node` (loading the script there on NOSCRIPT): one round trip."""
        try:
            return await self._client.execute_command(
                "EVALSHA", script.sha, 0, *args, target_nodes=node
            )
        except rexc.NoScriptError:
            await self._client.execute_command("SCRIPT LOAD", script.script, target_nodes=node)
            return await self._client.execute_command(
                "EVALSHA", script.sha, 0, *args, target_nodes=node
            )

    async def _per_node(
        self,
        what: str,
        keys: Sequence[str],
        call: Callable[[ClusterNode, list[int]], Awaitable[list[T]]],
    ) -> list[T]:
        await self._initialized()
        groups = self._by_node(keys)
        async with self._call(what):
            replies = await asyncio.gather(*(call(node, idx) for node, idx in groups.values()))
        results: list[T | None] = [None] * len(keys)
        for (_, indices), reply in zip(groups.values(), replies, strict=True):
            if len(reply) != len(indices):
                raise Internal(f"redis cluster {what}: {len(reply)} replies for {len(indices)}")
            for i, value in zip(indices, reply, strict=True):
                results[i] = value
        return cast(list[T], results)

    async def ping(self) -> None:
        async with self._call("PING"):
            await self._client.initialize()
            await self._client.ping(target_nodes=RedisCluster.PRIMARIES)

    async def load_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []

        async def load(node: ClusterNode, indices: list[int]) -> list[bytes | None]:
            reply = await self._script_on(node, self._load, [keys[i] for i in indices])
            # A Lua table ending in nils comes back short: pad it.
            values = list(reply or [])
            return values + [None] * (len(indices) - len(values))

        return await self._per_node("load script", keys, load)

    async def commit_many(self, commits: Sequence[Commit]) -> list[bool]:
        if not commits:
            return []

        async def commit(node: ClusterNode, indices: list[int]) -> list[bool]:
            args: list[Any] = []
            for i in indices:
                c = commits[i]
                args += (c.key, c.token, c.value, max(1, int(c.ttl_s * 1000)))
            reply = await self._script_on(node, self._commit, args)
            return [bool(flag) for flag in reply]

        return await self._per_node("commit script", [c.key for c in commits], commit)

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        await self._initialized()
        async with self._call("SET"):
            done = await self._client.set(
                key, value, px=max(1, int(ttl_s * 1000)), nx=only_if_absent
            )
        return bool(done)

    async def get(self, key: str) -> bytes | None:
        await self._initialized()
        async with self._call("GET"):
            value = await self._client.get(key)
        return cast(bytes | None, value)

    async def delete(self, key: str) -> bool:
        await self._initialized()
        async with self._call("DEL"):
            removed = await self._client.delete(key)
        return bool(removed)

    async def ttl(self, key: str) -> float | None:
        await self._initialized()
        async with self._call("PTTL"):
            ms = await self._client.pttl(key)
        return None if ms < 0 else ms / 1000.0

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        try:
            await self._client.aclose()
        except _UNAVAILABLE:
            logger.debug("closing redis cluster client", exc_info=True)
