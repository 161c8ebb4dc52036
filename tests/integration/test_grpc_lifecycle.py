"""Server lifecycle: health transitions, reflection, SIGTERM drain losing no accepted step."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.protocol.inference import grpc_service_pb2 as kserve_pb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kserve_grpc
from rnnserve.service.record import read_header
from rnnserve.service.server import RnnserveServer
from rnnserve.service.settings import Settings
from rnnserve.service.store import session_key
from tests.integration._grpc_util import (
    delete_namespace,
    native_stub,
    pb,
    pb_grpc,
    running_server,
    tensor,
    xs,
)
from tests.servers import ServerThread, close_output, spawn_server, unique

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "rnnserve.v1.Recurrent", "inference.GRPCInferenceService")


@pytest.fixture(scope="module")
def lstm_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lstm-only")
    shutil.copytree(model_repo / "lstm", root / "lstm")
    return root


# -- health ------------------------------------------------------------------------------
async def _statuses(health: health_pb2_grpc.HealthStub) -> list[int]:
    return [
        (await health.Check(health_pb2.HealthCheckRequest(service=name))).status
        for name in SERVICES
    ]


async def test_health_not_serving_while_loading_serving_after_not_serving_on_drain(
    lstm_repo: Path,
) -> None:
    server = RnnserveServer(
        Settings(model_repository=lstm_repo, port=0, host="127.0.0.1", warmup=False)
    )
    # Holding the repository's lock keeps `start()` in its model loading (bound, not
    # yet loaded) for as long as the test needs: a slow model load, made deterministic.
    loading = server.repository._lock
    await loading.acquire()
    starting = asyncio.ensure_future(server.start())
    try:
        while server.port is None:  # bound once the port is known
            assert not starting.done(), starting.exception()
            await asyncio.sleep(0.01)
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await _statuses(health) == [NOT_SERVING] * 3
            kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
            assert not (await kserve.ServerReady(kserve_pb.ServerReadyRequest())).ready
            # Until the models are loaded, calls that need them are UNAVAILABLE (which
            # clients retry), not NOT_FOUND.
            with pytest.raises(aio.AioRpcError) as early:
                await pb_grpc.RecurrentStub(channel).ListModels(pb.ListModelsRequest())
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in (early.value.details() or "")

            loading.release()
            assert await starting == server.port
            assert await _statuses(health) == [SERVING] * 3
            assert (await kserve.ServerReady(kserve_pb.ServerReadyRequest())).ready

            # A stream that is open when the drain starts keeps working until it ends.
            native = pb_grpc.RecurrentStub(channel)
            await native.StartSession(pb.StartSessionRequest(model="lstm", session_id="open"))
            stream = native.StepStream()

            async def step_on_stream(seq: int) -> pb.StepResponse:
                x = tensor("x", xs(1, 1, seed=seq)[0, 0])
                await stream.write(
                    pb.StepRequest(model="lstm", session_id="open", inputs=[x], seq=seq)
                )
                reply: pb.StepResponse = await stream.read()
                assert not reply.HasField("error"), reply.error
                return reply

            assert (await step_on_stream(0)).seq == 1

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            stopping = asyncio.ensure_future(server.stop(30.0))
            # The drain reports NOT_SERVING to a watcher before the server goes away...
            assert (await watch.read()).status == NOT_SERVING
            assert await _statuses(health) == [NOT_SERVING] * 3
            # ...refuses new calls with UNAVAILABLE...
            with pytest.raises(aio.AioRpcError) as refused:
                await native.ListModels(pb.ListModelsRequest())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (refused.value.details() or "")
            # ...and lets the calls it had accepted finish.
            assert (await step_on_stream(1)).seq == 2
            await stream.done_writing()
            assert await stream.read() == aio.EOF
            watch.cancel()
            await stopping
        # After the drain new calls are refused.
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(aio.AioRpcError) as info:
                await pb_grpc.RecurrentStub(channel).ListModels(pb.ListModelsRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if loading.locked():
            loading.release()
        with contextlib.suppress(Exception):
            await starting
        await server.stop(0)


# -- reflection --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(lstm_repo: Path) -> Iterator[ServerThread]:
    with running_server(lstm_repo, warmup=False) as running:
        yield running


def test_reflection_lists_and_describes_the_services(plain: ServerThread) -> None:
    with grpc.insecure_channel(plain.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        symbols = [
            "rnnserve.v1.Recurrent",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        ]
        requests = [reflection_pb2.ServerReflectionRequest(list_services="")] + [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols
        ]
        listing, *files = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listing.list_services_response.service}
    assert set(symbols) <= names
    for symbol, reply in zip(symbols, files, strict=True):
        assert not reply.HasField("error_response"), reply.error_response
        services = set()
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            services |= {f"{proto.package}.{s.name}" for s in proto.service}
        assert symbol in services


# -- SIGTERM drain -----------------------------------------------------------------------
SESSIONS = 12
BEFORE_SIGTERM = 15  # acknowledged steps per session, on average, before the signal


def test_sigterm_drain_loses_no_acknowledged_step(lstm_repo: Path, redis_url: str) -> None:
    namespace = f"test-drain-{unique()}"
    process, port = spawn_server(
        lstm_repo,
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--grace-period-s",
        "30",
    )
    ids = [unique("drain") for _ in range(SESSIONS)]
    acked = [0] * SESSIONS
    failures: list[tuple[int, grpc.StatusCode, str, bool]] = []
    total = threading.Semaphore(0)
    sigterm_sent = threading.Event()
    x = xs(1, 1, seed=3)[0, 0]

    def client(index: int, stub: pb_grpc.RecurrentStub) -> None:
        while True:
            request = pb.StepRequest(
                model="lstm",
                session_id=ids[index],
                inputs=[tensor("x", x)],
                seq=acked[index],
                request_id=f"{index}:{acked[index]}",
            )
            try:
                reply = stub.Step(request, timeout=60)
            except grpc.RpcError as exc:
                failures.append((index, exc.code(), exc.details(), sigterm_sent.is_set()))
                return
            assert reply.seq == acked[index] + 1
            acked[index] += 1
            total.release()

    try:
        channel, stub = native_stub(f"127.0.0.1:{port}")
        with channel:
            for session_id in ids:
                stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id))
            threads = [
                threading.Thread(target=client, args=(i, stub), daemon=True)
                for i in range(SESSIONS)
            ]
            for thread in threads:
                thread.start()
            for _ in range(SESSIONS * BEFORE_SIGTERM):
                assert total.acquire(timeout=120), "the clients stopped before SIGTERM"
            sigterm_sent.set()
            os.kill(process.pid, signal.SIGTERM)
            for thread in threads:
                thread.join(timeout=120)
                assert not thread.is_alive()
        assert process.wait(timeout=120) == 0

        # Every client stopped on a refusal after the drain began, and on nothing else.
        assert len(failures) == SESSIONS
        for index, code, details, after_sigterm in failures:
            assert after_sigterm, (index, code, details)
            assert code == grpc.StatusCode.UNAVAILABLE, (index, code, details)

        # The store holds exactly the acknowledged steps of every session.
        client_ = redis.Redis.from_url(redis_url)
        try:
            raws = client_.mget([session_key(namespace, "lstm", s) for s in ids])
        finally:
            client_.close()
        seqs = [read_header(raw).seq if raw is not None else None for raw in raws]
        assert seqs == acked
        assert sum(acked) >= SESSIONS * BEFORE_SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        close_output(process)
        delete_namespace(redis_url, namespace)
