"""`RedisClusterStore`: session records in a Redis Cluster, one round trip per node.

A batch's keys hash to many slots, and Redis refuses a multi-key command (`MGET`, or
a script's declared `KEYS`) whose keys span slots, even on one node. So the keys
are grouped by the node that owns their slot, and each node gets ONE call per
batch: a read-only script that GETs every key of the group (load) and the
compare-and-set script (commit), both with the `allow-cross-slot-keys` flag (Redis
7+) and the keys passed as arguments, sent to that node directly. The groups run
concurrently, so a batch costs one round trip per node, in parallel.

Each node's commit script is atomic; a batch spread over nodes is not. A node that
fails (dead, cut off, failing over) fails only its own keys: the call raises
`PartialStoreFailure` naming them, with the other nodes' answers, so only the steps
of sessions on that node fail UNAVAILABLE (their commit may have landed: a retry
with the same `seq` and request id is then replayed from the stored reply). A
MOVED/ASK reply, or a script refused for a "non local key" (a stale slot map after
a failover or a resharding) or "while the cluster is down" (a failover under way),
refreshes the slot map and is `StoreUnavailable` too.

Durability (`min_replicas_ack=N`): each node's commit is pipelined with `WAIT N
timeout` on the same connection (one round trip per node, as without it); a node
whose replicas did not confirm in time fails its keys as above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import Internal, PartialStoreFailure, RnnserveError, StoreUnavailable
from ._base import Commit
from ._redis_common import (
    UNAVAILABLE_ERRORS,
    acked_reply,
    check_ack_settings,
    commit_args,
    ttl_ms,
)

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

# ARGV[6i-5]: a key, then its `commit_args` (the token's first and last byte,
# the token, the new value, its TTL in milliseconds). As `COMMIT_SCRIPT`.
CLUSTER_COMMIT_SCRIPT = """#!lua flags=allow-cross-slot-keys
local applied = {}
for i = 1, #ARGV / 6 do
  local base = 6 * i
  local key = ARGV[base - 5]
  if redis.call('GETRANGE', key, ARGV[base - 4], ARGV[base - 3]) == ARGV[base - 2] then
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

# Error replies of a node that no longer owns a key's slot (its slot map is stale), or
# of a cluster that is failing over (a script's own call refused: "...while the
# cluster is down"): the topology changes, nothing was applied.
_STALE_SLOT_MAP = (
    "non local key", "MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "cluster is down",
    "LOADING",
)  # fmt: skip


def _stale_slot_map(exc: BaseException) -> bool:
    return isinstance(exc, rexc.ResponseError) and any(m in str(exc) for m in _STALE_SLOT_MAP)


class RedisClusterStore:
    """The `StateStore` over a Redis Cluster (Redis >= 7): keys grouped by node."""

    def __init__(
        self,
        client: RedisCluster,
        *,
        op_timeout_s: float = 5.0,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 250,
    ) -> None:
        check_ack_settings(min_replicas_ack, replicas_ack_timeout_ms)
        self._client = client
        self._op_timeout_s = op_timeout_s
        self._load = client.register_script(LOAD_SCRIPT)
        self._commit = client.register_script(CLUSTER_COMMIT_SCRIPT)
        self._refresh: asyncio.Task[None] | None = None
        # Every node object this store called directly: a slot-map refresh may drop one
        # from redis-py's cache while it still holds connections; `aclose` closes them.
        self._called: dict[int, ClusterNode] = {}
        self.min_replicas_ack = min_replicas_ack
        self.replicas_ack_timeout_ms = replicas_ack_timeout_ms

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
        return cls(
            client,
            op_timeout_s=op_timeout_s,
            min_replicas_ack=min_replicas_ack,
            replicas_ack_timeout_ms=replicas_ack_timeout_ms,
        )

    @property
    def client(self) -> RedisCluster:
        return self._client

    def _translate(self, what: str, exc: BaseException) -> RnnserveError:
        """A redis-py error as the store's error (refreshing the slot map if it is stale)."""
        if isinstance(exc, RnnserveError):
            return exc
        message = f"redis cluster {what} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, _TOPOLOGY_CHANGED + UNAVAILABLE_ERRORS) or _stale_slot_map(exc):
            self._refresh_slots()
            return StoreUnavailable(message)
        if isinstance(exc, asyncio.TimeoutError):
            return StoreUnavailable(message)
        return Internal(message)

    @asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                yield
        except rexc.RedisError as exc:
            raise self._translate(what, exc) from exc
        except UNAVAILABLE_ERRORS as exc:
            raise self._translate(what, exc) from exc

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
        for node, _ in groups.values():
            self._called.setdefault(id(node), node)
        return groups

    async def _pipeline_on(self, node: ClusterNode, *commands: tuple[Any, ...]) -> list[Any]:
        """`commands` sent to `node` in one write, their replies read in order (an error
        reply is its exception, in place)."""
        pending = [PipelineCommand(k, *command) for k, command in enumerate(commands)]
        await node.execute_pipeline(pending)  # type: ignore[arg-type]
        return [command.result for command in pending]

    async def _on_node(self, node: ClusterNode, what: str, *command: Any) -> Any:
        """`command` on `node`, followed there by `WAIT` when `min_replicas_ack`: one
        round trip. Raises the command's error reply, or `StoreUnavailable` when too
        few of the node's replicas confirmed the write."""
        if not self.min_replicas_ack:
            return await node.execute_command(*command)
        wait = ("WAIT", self.min_replicas_ack, self.replicas_ack_timeout_ms)
        reply, acked = await self._pipeline_on(node, command, wait)
        return acked_reply(
            f"{what} on {node.name}",
            reply,
            acked,
            self.min_replicas_ack,
            self.replicas_ack_timeout_ms,
        )

    async def _script_on(
        self, node: ClusterNode, script: Any, args: list[Any], *, write: bool = False
    ) -> Any:
        """EVALSHA on `node` (loading the script there on NOSCRIPT): one round trip."""
        what = "commit" if write else "load"
        call = self._on_node if write else self._read_on
        try:
            return await call(node, what, "EVALSHA", script.sha, 0, *args)
        except rexc.NoScriptError:
            await node.execute_command("SCRIPT LOAD", script.script)
            return await call(node, what, "EVALSHA", script.sha, 0, *args)

    async def _read_on(self, node: ClusterNode, what: str, *command: Any) -> Any:
        # The node itself, not the client: a failing node must not make redis-py
        # reset the connections and slot map that the other nodes' calls are using.
        return await node.execute_command(*command)

    async def _per_node(
        self,
        what: str,
        keys: Sequence[str],
        call: Callable[[ClusterNode, list[int]], Awaitable[list[T]]],
    ) -> list[T]:
        """`call` once per node (concurrently) with the indices of its keys. A node that
        fails fails its keys only: `PartialStoreFailure` when others answered."""
        await self._initialized()
        groups = list(self._by_node(keys).values())

        async def bounded(node: ClusterNode, indices: list[int]) -> list[T]:
            async with self._call(f"{what} on {node.name}"):
                return await call(node, indices)

        replies = await asyncio.gather(
            *(bounded(node, idx) for node, idx in groups), return_exceptions=True
        )
        results: list[Any] = [None] * len(keys)
        failed: dict[int, StoreUnavailable] = {}
        first: BaseException | None = None
        for (_, indices), reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, StoreUnavailable):
                    raise reply  # INTERNAL (a bug, a refused script): the whole call
                first = first or reply
                failed.update(dict.fromkeys(indices, reply))
                continue
            if len(reply) != len(indices):
                raise Internal(f"redis cluster {what}: {len(reply)} replies for {len(indices)}")
            for i, value in zip(indices, reply, strict=True):
                results[i] = value
        if first is not None:
            if len(failed) == len(keys):
                raise first
            nodes = sorted({str(e) for e in failed.values()})
            raise PartialStoreFailure(
                f"{len(failed)} of {len(keys)} key(s) failed: {'; '.join(nodes)}",
                results=results,
                failed=failed,
            )
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
                args += (c.key, *commit_args(c))
            reply = await self._script_on(node, self._commit, args, write=True)
            return [bool(flag) for flag in reply]

        return await self._per_node("commit script", [c.key for c in commits], commit)

    def _node_of(self, key: str) -> ClusterNode:
        return self._client.nodes_manager.get_node_from_slot(self._client.keyslot(key))

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        await self._initialized()
        px = ttl_ms(ttl_s)
        async with self._call("SET"):
            if self.min_replicas_ack:
                nx = ("NX",) if only_if_absent else ()
                node = self._node_of(key)
                done = await self._on_node(node, "SET", "SET", key, value, "PX", px, *nx)
            else:
                done = await self._client.set(key, value, px=px, nx=only_if_absent)
        return bool(done)

    async def get(self, key: str) -> bytes | None:
        await self._initialized()
        async with self._call("GET"):
            value = await self._client.get(key)
        return cast(bytes | None, value)

    async def delete(self, key: str) -> bool:
        await self._initialized()
        async with self._call("DEL"):
            if self.min_replicas_ack:
                removed = await self._on_node(self._node_of(key), "DEL", "DEL", key)
            else:
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
        except UNAVAILABLE_ERRORS:
            logger.debug("closing redis cluster client", exc_info=True)
        await asyncio.gather(
            *(node.disconnect() for node in self._called.values()), return_exceptions=True
        )
        self._called.clear()
