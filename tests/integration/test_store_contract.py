"""The StateStore contract, the same suite over MemoryStore and RedisStore (real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from rnnserve.service.errors import InvalidArgument
from rnnserve.service.record import CAS_TOKEN_OFFSET, SessionRecord
from rnnserve.service.store import Commit, StateStore, session_key


def record(seq: int, incarnation: int = 1, payload: str = "") -> SessionRecord:
    return SessionRecord(
        model="m", version="1", seq=seq, incarnation=incarnation, last_request_id=payload
    )


async def test_load_many_and_compare_and_set(
    make_store: Callable[[], StateStore], namespace: str
) -> None:
    store = make_store()
    keys = [session_key(namespace, "m", f"s{i}") for i in range(4)]
    assert await store.load_many(keys) == [None] * 4
    assert await store.load_many([]) == []
    for i, key in enumerate(keys[:3]):
        assert await store.put(key, record(i).encode(), 60)
    loaded = await store.load_many(keys)
    assert [None if raw is None else SessionRecord.decode(raw).seq for raw in loaded] == [
        0,
        1,
        2,
        None,
    ]
    commits = [
        Commit(
            keys[0], record(0).cas_token, record(1, payload="a").encode(), 60, CAS_TOKEN_OFFSET
        ),  # matches
        Commit(keys[1], record(0).cas_token, record(9).encode(), 60, CAS_TOKEN_OFFSET),  # stale seq
        Commit(
            keys[2], record(2, incarnation=2).cas_token, record(9).encode(), 60, CAS_TOKEN_OFFSET
        ),  # restarted
        Commit(keys[3], record(0).cas_token, record(9).encode(), 60, CAS_TOKEN_OFFSET),  # absent
    ]
    assert await store.commit_many(commits) == [True, False, False, False]
    assert await store.commit_many([]) == []
    after = await store.load_many(keys)
    assert SessionRecord.decode(after[0]).last_request_id == "a"  # type: ignore[arg-type]
    assert after[1:] == loaded[1:]
    # the same commit again: its token is stale now
    assert await store.commit_many(commits[:1]) == [False]


async def test_put_get_delete_ttl(make_store: Callable[[], StateStore], namespace: str) -> None:
    store = make_store()
    key = session_key(namespace, "m", "a")
    assert await store.get(key) is None
    assert await store.ttl(key) is None
    assert await store.put(key, record(0).encode(), 30)
    assert not await store.put(key, record(5).encode(), 30, only_if_absent=True)
    assert SessionRecord.decode(await store.get(key)).seq == 0  # type: ignore[arg-type]
    ttl = await store.ttl(key)
    assert ttl is not None and 0 < ttl <= 30
    # a commit sets the TTL to its own idle timeout
    (ok,) = await store.commit_many(
        [Commit(key, record(0).cas_token, record(1).encode(), 300, CAS_TOKEN_OFFSET)]
    )
    assert ok
    ttl = await store.ttl(key)
    assert ttl is not None and 30 < ttl <= 300
    assert await store.delete(key)
    assert not await store.delete(key)
    assert await store.get(key) is None


async def test_the_token_is_compared_where_the_commit_says(
    make_store: Callable[[], StateStore], namespace: str
) -> None:
    """The store knows no record layout: it compares the bytes at `token_at`."""
    store = make_store()
    key = session_key(namespace, "m", "opaque")
    assert await store.put(key, b"head-TOKEN-tail", 30)
    assert await store.commit_many([Commit(key, b"TOKEN", b"v2", 30, 4)]) == [False]
    assert await store.commit_many([Commit(key, b"head", b"v2", 30, 5)]) == [False]
    assert await store.get(key) == b"head-TOKEN-tail"
    assert await store.commit_many([Commit(key, b"TOKEN", b"v2-TOKEN2", 30, 5)]) == [True]
    assert await store.get(key) == b"v2-TOKEN2"
    # past the value's end: no match (Redis's GETRANGE gives what is there, or "")
    assert await store.commit_many([Commit(key, b"TOKEN", b"v3", 30, 40)]) == [False]


async def test_records_expire(make_store: Callable[[], StateStore], namespace: str) -> None:
    store = make_store()
    key = session_key(namespace, "m", "a")
    await store.put(key, record(0).encode(), 0.1)
    await asyncio.sleep(0.4)
    assert await store.get(key) is None
    assert await store.load_many([key]) == [None]
    assert await store.commit_many(
        [Commit(key, record(0).cas_token, b"x" * 30, 10, CAS_TOKEN_OFFSET)]
    ) == [False]


@pytest.mark.parametrize(
    ("namespace_", "model", "session"),
    [
        pytest.param("a:b", "m", "s", id="colon-in-namespace"),
        pytest.param("ns", "m:x", "s", id="colon-in-model"),
        pytest.param("ns", "m", "", id="empty-session"),
        pytest.param("ns", "m", "x" * 300, id="long-session"),
    ],
)
def test_session_key_rejects_ambiguous_parts(namespace_: str, model: str, session: str) -> None:
    with pytest.raises(InvalidArgument):
        session_key(namespace_, model, session)


def test_session_key_layout() -> None:
    assert session_key("ns", "model", "a:b c") == "rnnserve:ns:model:a:b c"
