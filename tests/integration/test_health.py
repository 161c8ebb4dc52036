"""Health is SERVING only while a model is loaded and the state store answers: a store that
goes away (and comes back), every model removed from the repository (and put back), and
a store that does not answer yet at start (waited for, NOT_SERVING meanwhile). The served
services go NOT_SERVING (readiness); "" (liveness) stays SERVING while the process runs."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.service.settings import Settings
from tests.models import write_repository
from tests.ports import free_port
from tests.redis_servers import RedisProcess
from tests.servers import ServerThread

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status(address: str, service: str = "rnnserve.v1.Recurrent") -> int:
    """What readiness reads (the served service); `service=""`: what liveness reads."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(reply.status)


def until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def settings(repo: Path, **options: object) -> Settings:
    return Settings(
        model_repository=repo, host="127.0.0.1", port=options.pop("port", 0), warmup=False,
        health_check_s=0.2, **options,
    )  # fmt: skip


def test_not_serving_while_the_store_is_down(tmp_path: Path) -> None:
    redis_server = RedisProcess(tmp_path, aof=True)
    redis_server.start()
    repo = write_repository(tmp_path / "models")
    try:
        with ServerThread(settings(repo, redis_url=redis_server.url)) as server:
            assert status(server.address) == SERVING
            redis_server.kill()
            until(lambda: status(server.address) == NOT_SERVING)
            assert status(server.address, "inference.GRPCInferenceService") == NOT_SERVING
            assert status(server.address, "") == SERVING  # alive: unready, not restarted
            redis_server.start()  # the same port
            until(lambda: status(server.address) == SERVING)
    finally:
        redis_server.kill()


def test_not_serving_while_no_model_is_loaded(tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "models")
    shutil.copytree(repo, tmp_path / "saved")
    with ServerThread(settings(repo, repository_poll_s=0.2)) as server:
        assert status(server.address) == SERVING
        for model in ("lstm", "ctx"):
            shutil.rmtree(repo / model)
        until(lambda: status(server.address) == NOT_SERVING)
        shutil.copytree(tmp_path / "saved" / "lstm", repo / "lstm")
        until(lambda: status(server.address) == SERVING)


def test_a_store_not_answering_at_start_is_waited_for(tmp_path: Path) -> None:
    redis_server = RedisProcess(tmp_path, aof=True)  # its port, not started yet
    repo = write_repository(tmp_path / "models")
    port = free_port()
    server = ServerThread(settings(repo, redis_url=redis_server.url, port=port))
    entered = threading.Event()

    def enter() -> None:
        server.__enter__()  # returns once the server serves
        entered.set()

    thread = threading.Thread(target=enter, daemon=True)
    thread.start()
    address = f"127.0.0.1:{port}"
    try:

        def bound_and_not_serving() -> bool:
            try:
                return status(address) == NOT_SERVING
            except grpc.RpcError:
                return False  # not bound yet (the models are loading)

        until(bound_and_not_serving, 60)
        time.sleep(1.0)  # several checks later: still waiting, still NOT_SERVING
        assert not entered.is_set() and status(address) == NOT_SERVING
        redis_server.start()
        assert entered.wait(30), "the server did not start once the store answered"
        assert status(address) == SERVING
    finally:
        if entered.is_set():
            server.__exit__(None, None, None)
        redis_server.kill()
