"""Idle expiry: a session left idle past its idle timeout is gone (NOT_FOUND on its
next step, counted in `rnnserve_sessions_expired_total` when the metrics module is
there); a session stepped more often than the timeout never expires. Both stores:
Redis expires the key by its TTL, the memory store by its clock."""

from __future__ import annotations

import importlib.util
import time
import uuid

import grpc
import numpy as np
import pytest

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import encode_tensor
from tests.models import FEATURES
from tests.redis_servers import delete_namespace
from tests.servers import ServerThread

IDLE_TIMEOUT_S = 2.0
HAS_METRICS = importlib.util.find_spec("rnnserve.service.metrics") is not None


def _expired_count() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "rnnserve_sessions_expired_total", {"model": "lstm", "version": "1"}
    )
    return value or 0.0


def _step(stub: pb_grpc.RecurrentStub, session: str) -> pb.StepResponse:
    x = encode_tensor("x", np.ones(FEATURES, "float32"))
    return stub.Step(pb.StepRequest(model="lstm", session_id=session, inputs=[x]), timeout=30)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_idle_sessions_expire_active_ones_do_not(model_repo, redis_url, store):
    namespace = f"rel-idle-{uuid.uuid4().hex[:10]}"
    options = {"redis_url": redis_url} if store == "redis" else {}
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        idle_timeout_s=IDLE_TIMEOUT_S, namespace=namespace, **options,
    )  # fmt: skip
    try:
        with ServerThread(settings) as server, grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecurrentStub(channel)
            for session in ("idle", "active"):
                stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session))
                _step(stub, session)
            expired_before = _expired_count() if HAS_METRICS else 0.0
            # The active session steps every 0.2 s for 2.5 idle timeouts; the idle one waits.
            began = time.monotonic()
            steps = 1
            while time.monotonic() - began < 2.5 * IDLE_TIMEOUT_S:
                assert _step(stub, "active").seq == steps + 1
                steps += 1
                time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as gone:
                _step(stub, "idle")
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            assert "does not exist (never started, ended, or expired)" in gone.value.details()
            ref = pb.SessionRef(model="lstm", session_id="idle")
            with pytest.raises(grpc.RpcError) as info:
                stub.GetSession(ref)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            active = stub.GetSession(pb.SessionRef(model="lstm", session_id="active"))
            assert active.seq == steps
            assert 0 < active.expires_in_seconds <= IDLE_TIMEOUT_S
            if HAS_METRICS:
                assert _expired_count() - expired_before == 1
    finally:
        if store == "redis":
            delete_namespace(redis_url, namespace)
    print(
        f"idle expiry ({store}): idle session NOT_FOUND after {2.5 * IDLE_TIMEOUT_S:.0f} s "
        f"(timeout {IDLE_TIMEOUT_S} s); active session alive after {steps} steps"
        + ("; expired metric +1" if HAS_METRICS else "; no metrics module: metric not checked")
    )
