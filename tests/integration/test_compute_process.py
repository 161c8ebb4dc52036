"""`compute_process`: each model version's step runs in a child process fed through shared
memory. Same answers as the in-process step (checked against the offline reference);
a child killed mid-run fails only the batch it had (UNAVAILABLE, not applied), is
started again, and the session goes on exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.integration._grpc_util import (
    cached_reference,
    decode_tensor,
    native_stub,
    pb,
    pb_grpc,
    running_server,
    tensor,
    xs,
)
from tests.models import CONTEXT
from tests.servers import ServerThread, unique

ATOL = 1e-5


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    with running_server(model_repo, compute_process=True, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    with channel:
        yield stub


def children(server: ServerThread) -> dict[str, int]:
    engine = server.server.engine
    return {f"{m}:1": engine.runner(m, "1").compute_process.pid for m in ("lstm", "ctx")}


def test_each_model_steps_in_a_child_process(server: ServerThread) -> None:
    pids = children(server)
    assert set(pids) == {"lstm:1", "ctx:1"}
    assert all(pid and pid != os.getpid() for pid in pids.values())
    assert len(set(pids.values())) == 2


def test_outputs_equal_the_reference(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    n, steps = 5, 4
    inputs = xs(n, steps, seed=31)
    context = np.random.default_rng(4).normal(size=(n, CONTEXT)).astype("float32")
    for model, constants in (("lstm", None), ("ctx", context)):
        want = cached_reference(model_repo, model, inputs, constants)
        ids = [unique(model) for _ in range(n)]
        for k, session_id in enumerate(ids):
            extra = {} if constants is None else {"constants": [tensor("context", context[k])]}
            stub.StartSession(pb.StartSessionRequest(model=model, session_id=session_id, **extra))
        for t in range(steps):  # StepMany rows, then single Steps: both through the child
            if t % 2 == 0:
                request = pb.StepManyRequest(
                    model=model, session_ids=ids, inputs=[tensor("x", inputs[:, t])]
                )
                reply = stub.StepMany(request)
                assert list(reply.codes) == [0] * n, list(reply.messages)
                got = decode_tensor(reply.outputs[0])
            else:
                got = np.stack(
                    [
                        decode_tensor(
                            stub.Step(
                                pb.StepRequest(
                                    model=model, session_id=s, inputs=[tensor("x", inputs[k, t])]
                                )
                            ).outputs[0]
                        )
                        for k, s in enumerate(ids)
                    ]
                )
            np.testing.assert_allclose(got, want[:, t], atol=ATOL)


def test_a_killed_child_fails_its_batch_and_is_restarted(
    server: ServerThread, stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    steps = 4
    inputs = xs(1, steps, seed=32)
    want = cached_reference(model_repo, "lstm", inputs)
    session_id = unique("lstm")
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id))

    def step(t: int) -> pb.StepResponse:
        return stub.Step(
            pb.StepRequest(
                model="lstm", session_id=session_id, inputs=[tensor("x", inputs[0, t])],
                seq=t, request_id=f"r{t}",
            ),
            timeout=120,
        )  # fmt: skip

    got = [decode_tensor(step(0).outputs[0])]
    old = children(server)["lstm:1"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    t = 1
    unavailable = 0
    while t < steps:
        try:
            reply = step(t)
        except grpc.RpcError as exc:  # the batch the child had, or a call during restart
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            unavailable += 1
            assert time.monotonic() < deadline
            time.sleep(0.2)
            continue  # retried with the same seq and request id
        assert reply.seq == t + 1
        got.append(decode_tensor(reply.outputs[0]))
        t += 1
    new = children(server)["lstm:1"]
    assert new != old
    assert server.server.engine.runner("lstm").compute_process.restarts == 1
    np.testing.assert_allclose(np.stack(got), want[0], atol=ATOL)
    info = stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id))
    assert info.seq == steps  # every step applied once, none lost, none twice
