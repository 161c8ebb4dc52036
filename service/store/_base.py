"""The store interface shared by every backend."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgument

KEY_PREFIX = "rnnserve"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_SESSION_ID_LENGTH = 256


def session_key(namespace: str, model: str, session_id: str) -> str:
    """`rnnserve:{namespace}:{model}:{session}`.

    Namespace and model are restricted to `[A-Za-z0-9_.-]` so no ':' can make two
    different triples collide; the session id (last) may be any non-empty text.
    """
    if not _NAME.match(namespace):
        raise InvalidArgument(f"namespace {namespace!r} must match [A-Za-z0-9_.-]{{1,128}}")
    if not _NAME.match(model):
        raise InvalidArgument(f"model name {model!r} must match [A-Za-z0-9_.-]{{1,128}}")
    check_session_id(session_id)
    return f"{KEY_PREFIX}:{namespace}:{model}:{session_id}"


def key_prefix(namespace: str, model: str) -> str:
    """`session_key(namespace, model, "")` without the session id: checks the namespace
    and model once for many sessions (append an id checked by `check_session_id`)."""
    return session_key(namespace, model, "-")[:-1]


def check_session_id(session_id: str) -> None:
    if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidArgument(
            f"session id must be 1 to {MAX_SESSION_ID_LENGTH} characters, got {len(session_id)}"
        )


@dataclass(frozen=True, slots=True)
class Commit:
    """Replace `key` with `value` if the stored value still holds `token` at byte
    `token_at` (a compare-and-set on part of the value: the record format decides
    which part, the store only compares bytes).

    `ttl_s` becomes the key's expiry (the session's idle timeout).
    """

    key: str
    token: bytes
    value: bytes
    ttl_s: float
    token_at: int


@runtime_checkable
class StateStore(Protocol):
    """Session records by key. Every method raises `StoreUnavailable` when the backend
    cannot be reached; a failed `commit_many` has applied all of its commits or none
    (on a Redis Cluster: per node; `PartialStoreFailure` names the keys that failed).

    `min_replicas_ack`: how many replicas every write must reach before it returns
    (0: none waited for). A write that reached fewer raises `StoreUnavailable`
    although it may have landed on the master."""

    min_replicas_ack: int

    async def ping(self) -> None:
        """Return once the store answers (raises `StoreUnavailable` when it does not)."""
        ...

    async def load_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The records under `keys` (None where absent), in one round trip."""
        ...

    async def commit_many(self, commits: Sequence[Commit]) -> list[bool]:
        """Apply each commit whose token matches, in one round trip; True where applied."""
        ...

    async def put(
        self, key: str, value: bytes, ttl_s: float, *, only_if_absent: bool = False
    ) -> bool:
        """Write `value` unconditionally (or only where no record exists); True if written."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> bool:
        """Remove a record; True if there was one."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires; None if absent or without expiry."""
        ...

    async def aclose(self) -> None: ...
