"""Shared test setup: quiet TensorFlow, deterministic seeds, a model repository and servers."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Iterator
from pathlib import Path

import keras
import pytest

from tests.servers import ServerThread, write_repository

REDIS_URL = os.environ.get("RNNSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models `lstm` (plain Keras LSTM) and `ctx` (step graph with a constant), version 1."""
    return write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # pragma: no cover - CI always has Redis
        pytest.fail(f"tests need Redis at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[ServerThread]:
    """A real server on port 0 in a background thread, with each state store."""
    from rnnserve.service.settings import Settings

    options: dict[str, object] = {"model_repository": model_repo, "port": 0, "host": "127.0.0.1"}
    if request.param == "redis":
        options["redis_url"] = request.getfixturevalue("redis_url")
        options["namespace"] = f"test-{os.getpid()}-{id(request)}"
    with ServerThread(Settings(**options)) as running:
        yield running
