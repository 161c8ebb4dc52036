"""Fixtures: real Redis (the shared one on 6379, or a private redis-server), real models."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
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

MAIN_REDIS_URL = "redis://127.0.0.1:6379/0"


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server (AOF on, fsync always) that a test may kill and restart."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
