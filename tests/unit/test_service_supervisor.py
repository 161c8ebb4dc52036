"""The supervisor's pure parts: how many processes, the children's settings, restarts.

Real processes: tests/integration/test_processes.py.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from rnnserve.service.settings import Settings, available_cpus
from rnnserve.service.supervisor import (
    RESTART_LIMIT,
    SUPERVISOR_ENV,
    ProcessesError,
    Supervisor,
    child_environment,
    pick_free_port,
    process_count,
)

REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 1),
        ({"processes": 1}, 1),
        ({"processes": 3, "redis_url": REDIS}, 3),
        ({"processes": 0, "redis_url": REDIS}, available_cpus()),
    ],
)
def test_process_count(options: dict[str, object], expected: int) -> None:
    assert process_count(Settings(**options)) == expected  # type: ignore[arg-type]


def test_several_processes_need_a_shared_store() -> None:
    with pytest.raises(ProcessesError) as raised:
        process_count(Settings(processes=2))
    assert str(raised.value) == (
        "--processes 2 needs a shared state store (--redis-url): "
        "the memory store lives in one process"
    )


def test_auto_with_the_memory_store_is_one_process(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rnnserve.service.supervisor"):
        assert process_count(Settings(processes=0)) == 1
    assert "processes=0 (auto): 1 process" in caplog.text
    assert "the memory store lives in one process" in caplog.text


def test_negative_processes_are_refused() -> None:
    with pytest.raises(ValueError, match="processes"):
        Settings(processes=-1)


def test_child_environment_carries_every_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings(
        host="127.0.0.1",
        port=9123,
        reuse_port=True,
        processes=1,
        model_repository=tmp_path / "models",
        max_queue_delay_ms=0.5,
        idle_timeout_s=float("inf"),
        state_dtype="float16",
        warmup=False,
        compute_threads=3,
        redis_url=REDIS,
        namespace="a b",
        auth_tokens="t=ns",
        log_level="WARNING",
        log_json=True,
    )
    base = {
        "PATH": os.environ["PATH"],
        "RNNSERVE_METRICS_PORT": "9999",  # None in settings: must not reach the child
        "rnnserve_tls_cert_file": "/nope",  # env names are case-insensitive
        "PROMETHEUS_MULTIPROC_DIR": "/stale",
        SUPERVISOR_ENV: "1",
        "RNNSERVE_ADDRESS": "kept",  # not a setting (the client's)
    }
    env = child_environment(settings, base, multiprocess_dir="/fresh")
    assert env["PATH"] == base["PATH"] and env["RNNSERVE_ADDRESS"] == "kept"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/fresh"
    assert "RNNSERVE_METRICS_PORT" not in env and SUPERVISOR_ENV not in env
    assert "rnnserve_tls_cert_file" not in env
    for name in list(os.environ):
        if name.lower().startswith("rnnserve_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_pick_free_port_can_be_bound() -> None:
    port = pick_free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_restarts_are_limited_per_window() -> None:
    supervisor = Supervisor(Settings(redis_url=REDIS), processes=2)
    assert all(supervisor._may_restart() for _ in range(RESTART_LIMIT))
    assert not supervisor._may_restart()


def test_children_get_the_port_no_metrics_and_a_share_of_the_cpus() -> None:
    settings = Settings(redis_url=REDIS, metrics_port=8002, processes=2)
    supervisor = Supervisor(settings, processes=2)
    supervisor.port = 9000
    child = supervisor._child_settings()
    assert (child.port, child.reuse_port, child.processes, child.metrics_port) == (
        9000,
        True,
        1,
        None,
    )
    assert child.compute_threads == max(1, available_cpus() // 2 - 1)
