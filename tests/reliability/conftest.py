"""Fixtures of the reliability tests: a private Redis per test where one is killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_servers import RedisProcess


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server with AOF (appendfsync always) on a spare loopback port."""
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.start()
    try:
        yield server
    finally:
        server.kill()
