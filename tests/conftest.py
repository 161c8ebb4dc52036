"""Shared test setup: quiet TensorFlow, deterministic seeds, a model repository and servers.

The fast lane for day-to-day work is `pytest -m "not slow"`: every test of the files in
`SLOW_FILES` (processes started and killed, fault injection, soak, fresh virtual
environments) is marked `slow` here, besides the tests marked one by one. CI runs all.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Iterator
from pathlib import Path

import keras
import pytest

from tests.models import write_repository
from tests.servers import ServerThread

#: Files whose every test is `slow` (paths from the repository root).
SLOW_FILES = frozenset(
    {
        "tests/reliability/test_backpressure.py",
        "tests/reliability/test_bad_input.py",
        "tests/reliability/test_cluster.py",
        "tests/reliability/test_duplicate_delivery.py",
        "tests/reliability/test_idle_expiry.py",
        "tests/reliability/test_namespaces.py",
        "tests/reliability/test_redis_restart.py",
        "tests/reliability/test_replica_death.py",
        "tests/reliability/test_soak.py",
        "tests/integration/test_compute_process.py",
        "tests/integration/test_grpc_lifecycle.py",
        "tests/integration/test_health.py",
        "tests/integration/test_processes.py",
        "tests/integration/test_redis_faults.py",
        "tests/integration/test_startup_errors.py",
        "tests/integration/test_two_engines_race.py",
    }
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(ROOT).as_posix() in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


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
