"""What the Redis stores (`_redis.py`, `_cluster.py`) share: the arguments of their
commit scripts, how a write's replica acknowledgements are read, and which failures
mean "Redis cannot be reached now"."""

from __future__ import annotations

from typing import Any

import redis.exceptions as rexc

from ..errors import StoreUnavailable
from ._base import Commit

# Errors that mean "Redis cannot be reached now", not "the request was wrong".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (Redis still loading its AOF)
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    TimeoutError,
    OSError,
)


def ttl_ms(ttl_s: float) -> int:
    """A TTL for `PX`: milliseconds, at least 1 (0 would be refused)."""
    return max(1, int(ttl_s * 1000))


def commit_args(commit: Commit) -> tuple[int, int, bytes, bytes, int]:
    """A commit script's arguments for `commit`: the token's first and last byte
    (GETRANGE's inclusive range), the token, the new value, its TTL in ms."""
    first = commit.token_at
    last = first + len(commit.token) - 1
    return first, last, commit.token, commit.value, ttl_ms(commit.ttl_s)


def check_ack_settings(min_replicas_ack: int, replicas_ack_timeout_ms: int) -> None:
    if min_replicas_ack < 0 or replicas_ack_timeout_ms < 1:
        raise ValueError("min_replicas_ack must be >= 0 and replicas_ack_timeout_ms >= 1")


def acked_reply(what: str, reply: Any, acked: Any, required: int, timeout_ms: int) -> Any:
    """The reply of a write pipelined with `WAIT required timeout_ms`: an error reply
    (of either) is raised; fewer than `required` replicas is `StoreUnavailable`."""
    if isinstance(reply, BaseException):
        raise reply
    if isinstance(acked, BaseException):
        raise acked
    if int(acked) < required:
        raise StoreUnavailable(
            f"redis {what}: the write reached {int(acked)} of the {required} replica(s) "
            f"that --redis-min-replicas-ack requires within {timeout_ms} ms, so it is not "
            "acknowledged (it may be applied: a retry with the same seq and request id "
            "is answered once)"
        )
    return reply
