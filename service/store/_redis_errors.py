"""What the Redis stores (`_redis.py`, `_cluster.py`) share about failures."""

from __future__ import annotations

import redis.exceptions as rexc

from ..errors import StoreUnavailable

# Errors that mean "Redis cannot be reached now", not "the request was wrong".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (Redis still loading its AOF)
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    TimeoutError,
    OSError,
)


def check_acked(what: str, acked: int, required: int, timeout_ms: int) -> None:
    """`StoreUnavailable` when a write reached fewer replicas than required."""
    if acked < required:
        raise StoreUnavailable(
            f"redis {what}: the write reached {acked} of the {required} replica(s) "
            f"that --redis-min-replicas-ack requires within {timeout_ms} ms, so it is not "
            "acknowledged (it may be applied: a retry with the same seq and request id "
            "is answered once)"
        )
