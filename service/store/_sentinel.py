"""Redis Sentinel: which server is the master, asked of a majority.

redis-py's `Sentinel.discover_master` takes the first Sentinel that answers. During a
failover, or when one Sentinel is cut off from the others, that one may still name
the old master (frozen, or cut off with some clients) while the others have
promoted a replica: writes acknowledged there are lost once it rejoins as a replica.
`AgreedSentinel` asks every Sentinel at once and names a master only when a majority
of all the configured Sentinels agree on its address and none of them is failing it
over; otherwise there is no master for now (`MasterNotFoundError`, a
`ConnectionError`: the store answers UNAVAILABLE and clients retry).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis.exceptions as rexc
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

__all__ = ["AgreedSentinel", "BlockingSentinelPool", "parse_sentinels", "sentinel_client"]


def parse_sentinels(spec: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` as `[(host, port), ...]` (ValueError naming a bad entry)."""
    addresses = []
    for entry in (part.strip() for part in spec.split(",")):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {entry!r} is not host:port")
        addresses.append((host, int(port)))
    if not addresses:
        raise ValueError("no sentinel address given")
    return addresses


class AgreedSentinel(Sentinel):
    """A `Sentinel` whose master is the one a majority of its Sentinels agree on."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        async def ask(sentinel: Any) -> Any:
            try:
                return await sentinel.sentinel_masters()
            except (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError) as exc:
                return exc

        answers = await asyncio.gather(*(ask(s) for s in self.sentinels))
        votes: Counter[tuple[str, int]] = Counter()
        failing_over = 0
        errors = []
        for sentinel, answer in zip(self.sentinels, answers, strict=True):
            if isinstance(answer, BaseException):
                errors.append(f"{_address(sentinel)}: {type(answer).__name__}")
                continue
            state = answer.get(service_name)
            if not state:
                continue
            if "failover_in_progress" in str(state.get("flags", "")):
                failing_over += 1
            elif self.check_master_state(state, service_name):
                votes[(str(state["ip"]), int(state["port"]))] += 1
        majority = len(self.sentinels) // 2 + 1
        if votes and not failing_over:
            address, count = votes.most_common(1)[0]
            if count >= majority:
                return address
        seen = ", ".join(f"{h}:{p} x{n}" for (h, p), n in votes.items()) or "none"
        why = f"; {failing_over} failing it over" if failing_over else ""
        unreachable = f"; unreachable: {', '.join(errors)}" if errors else ""
        raise MasterNotFoundError(
            f"no master of {service_name!r} that {majority} of {len(self.sentinels)} "
            f"sentinels agree on (named: {seen}{why}{unreachable})"
        )


def _address(sentinel: Any) -> str:
    kwargs = sentinel.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel pool that, beyond `max_connections`, waits for a free connection
    (up to `timeout`) like `BlockingConnectionPool`, instead of failing at once."""


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service: str,
    *,
    socket_timeout_s: float,
    connect_timeout_s: float,
    pool_timeout_s: float,
    max_connections: int,
    **kwargs: Any,
) -> tuple[Any, AgreedSentinel]:
    """A redis-py asyncio client of `service`'s master, found by `AgreedSentinel`
    (returned too: close it with the client)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    sentinel = AgreedSentinel(  # type: ignore[no-untyped-call]
        list(sentinels),
        sentinel_kwargs={
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        },
    )
    client = sentinel.master_for(
        service,
        redis_class=Redis,
        connection_pool_class=BlockingSentinelPool,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 1),
        **kwargs,
    )
    return client, sentinel
