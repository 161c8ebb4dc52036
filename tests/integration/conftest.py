"""Fixtures: real Redis (the shared one on 6379, or a private redis-server), real models."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

# The helpers next to this file are imported by name, here and in spawned workers.
sys.path.insert(0, str(Path(__file__).parent))

from _models import constants_model, lstm_model, step_function

from rnnserve.core import StepFunction
from rnnserve.service.store import MemoryStore, RedisStore, StateStore
from tests.redis_servers import MAIN_REDIS_URL, RedisProcess


@pytest.fixture(scope="session")
def lstm() -> tuple[object, StepFunction]:
    """(keras LSTM(16)+Dense(4) model, its StepFunction), shared by the whole run."""
    model = lstm_model()
    return model, step_function(model)


@pytest.fixture(scope="session")
def const_step() -> StepFunction:
    return step_function(constants_model())


@pytest.fixture(scope="session")
def main_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(MAIN_REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"no Redis on {MAIN_REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key namespace used by this test only; its keys on 6379 are deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    if "main_redis" in request.fixturenames:
        client: redis.Redis = request.getfixturevalue("main_redis")
        keys = list(client.scan_iter(match=f"rnnserve:{ns}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")])
async def make_store(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[Callable[[], StateStore]]:
    """New store handles onto one backend (memory: one shared dict; redis: 6379).
    Every handle is closed after the test (closing twice is harmless)."""
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared
        return
    request.getfixturevalue("main_redis")
    made: list[RedisStore] = []

    def make() -> StateStore:
        made.append(RedisStore.from_url(MAIN_REDIS_URL))
        return made[-1]

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, aof=True)
    server.start()
    try:
        yield server
    finally:
        server.kill()
