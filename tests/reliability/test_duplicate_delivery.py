"""Duplicate delivery: a step delivered twice is applied once.

- retried after a lost reply (the first reply is dropped, as on a client timeout),
  to the same replica and to the other one;
- sent concurrently to two replicas sharing one Redis (both deliveries race for the
  same compare-and-set).

Either way both answers carry the same outputs, exactly one of them is the applying
one (the other `replayed`), and the session's outputs equal the offline reference."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from grpc import aio

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import decode_tensor, encode_tensor
from tests.integration._grpc_util import cached_reference
from tests.models import FEATURES
from tests.redis_servers import delete_namespace
from tests.servers import ServerThread

SESSIONS = 32
STEPS = 8


@pytest.fixture
def replicas(model_repo, redis_url):
    namespace = f"rel-dup-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        redis_url=redis_url, namespace=namespace,
    )  # fmt: skip
    try:
        with ServerThread(settings) as a, ServerThread(settings) as b:
            yield a, b
    finally:
        delete_namespace(redis_url, namespace)


def _request(session: str, t: int, x: np.ndarray) -> pb.StepRequest:
    return pb.StepRequest(
        model="lstm", session_id=session, seq=t, request_id=f"{session}#{t}",
        inputs=[encode_tensor("x", x)],
    )  # fmt: skip


@pytest.mark.parametrize("retry_to", ["same", "other"])
async def test_retry_after_a_lost_reply_is_applied_once(model_repo, replicas, retry_to):
    a, b = replicas
    xs = np.random.default_rng(3).normal(size=(1, STEPS, FEATURES)).astype("float32")
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        first = pb_grpc.RecurrentStub(ca)
        second = first if retry_to == "same" else pb_grpc.RecurrentStub(cb)
        session = f"retry-{uuid.uuid4().hex[:8]}"
        await first.StartSession(pb.StartSessionRequest(model="lstm", session_id=session))
        outputs = []
        for t in range(STEPS):
            request = _request(session, t, xs[0, t])
            lost = await first.Step(request)  # applied; the client never sees this reply
            again = await second.Step(request)
            assert (lost.replayed, again.replayed) == (False, True)
            assert lost.seq == again.seq == t + 1
            assert lost.outputs == again.outputs
            outputs.append(decode_tensor(again.outputs[0]))
        info = await second.GetSession(pb.SessionRef(model="lstm", session_id=session))
    assert info.seq == STEPS
    np.testing.assert_allclose(
        np.stack(outputs), cached_reference(model_repo, "lstm", xs)[0], atol=1e-5
    )


async def test_the_same_step_sent_to_two_replicas_at_once_is_applied_once(model_repo, replicas):
    a, b = replicas
    xs = np.random.default_rng(4).normal(size=(SESSIONS, STEPS, FEATURES)).astype("float32")
    outputs = np.zeros((SESSIONS, STEPS, 3), "float32")
    applied = replayed = 0
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        stubs = pb_grpc.RecurrentStub(ca), pb_grpc.RecurrentStub(cb)
        ids = [f"dup{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
        for session in ids:
            await stubs[0].StartSession(pb.StartSessionRequest(model="lstm", session_id=session))

        async def drive(i: int) -> None:
            nonlocal applied, replayed
            for t in range(STEPS):
                request = _request(ids[i], t, xs[i, t])
                one, two = await asyncio.gather(stubs[0].Step(request), stubs[1].Step(request))
                assert one.seq == two.seq == t + 1
                assert one.outputs == two.outputs
                assert sorted([one.replayed, two.replayed]) == [False, True]
                applied += 1
                replayed += 1
                outputs[i, t] = decode_tensor(one.outputs[0])

        await asyncio.wait_for(asyncio.gather(*(drive(i) for i in range(SESSIONS))), 300)
        infos = [await stubs[1].GetSession(pb.SessionRef(model="lstm", session_id=s)) for s in ids]
    cas_retries = sum(r.server.engine.runner("lstm").stats.cas_retries for r in (a, b))
    assert [info.seq for info in infos] == [STEPS] * SESSIONS
    np.testing.assert_allclose(outputs, cached_reference(model_repo, "lstm", xs), atol=1e-5)
    print(
        f"duplicate delivery: {applied} steps each sent to both replicas at once: "
        f"{applied} applied, {replayed} replayed, {cas_retries} lost compare-and-sets re-judged"
    )
