"""Replica death: two `rnnserve serve` processes share one Redis; 64 sessions step
through `rnnserve.client` (both addresses); the replica they use is SIGKILLed
mid-stream. Every session finishes on the survivor, and its outputs equal the offline
reference of exactly the steps acknowledged: no step lost, none applied twice."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from rnnserve.client import AsyncClient, RetryPolicy
from tests.integration._grpc_util import cached_reference
from tests.models import FEATURES
from tests.redis_servers import delete_namespace
from tests.reliability._procs import Replica

SESSIONS = 64
STEPS = 24
KILL_AFTER = 6  # every session has this many steps acknowledged before the kill


@pytest.mark.slow
async def test_sigkill_one_replica_under_64_sessions(model_repo, redis_url):
    namespace = f"rel-death-{uuid.uuid4().hex[:10]}"
    flags = ("--redis-url", redis_url, "--namespace", namespace)
    first = Replica(model_repo, *flags)
    second = Replica(model_repo, *flags)
    xs = np.random.default_rng(11).normal(size=(SESSIONS, STEPS, FEATURES)).astype("float32")
    outputs: list[list[np.ndarray]] = [[] for _ in range(SESSIONS)]
    errors: list[BaseException] = []
    replayed = 0
    retry = RetryPolicy(attempts=12, initial_backoff_s=0.05, max_backoff_s=1.0)
    try:
        async with AsyncClient([first.address, second.address], retry=retry) as client:
            sessions = [await client.session("lstm") for _ in range(SESSIONS)]
            assert client.address == first.address
            ready = asyncio.Barrier(SESSIONS + 1)

            async def drive(i: int) -> None:
                nonlocal replayed
                session = sessions[i]
                for t in range(STEPS):
                    if t == KILL_AFTER:
                        await ready.wait()
                    try:
                        outputs[i].append(np.asarray(await session.step(xs[i, t])))
                    except Exception as exc:  # counted: the test wants none
                        errors.append(exc)
                        return
                    replayed += session.last_replayed

            drivers = [asyncio.ensure_future(drive(i)) for i in range(SESSIONS)]
            await ready.wait()  # all sessions at step KILL_AFTER; their next steps in flight
            await asyncio.sleep(0.05)
            first.kill()
            await asyncio.wait_for(asyncio.gather(*drivers), 300)
            assert client.address == second.address
            final = [await client.attach("lstm", s.session_id) for s in sessions]
    finally:
        first.kill()
        second.close()
        delete_namespace(redis_url, namespace)

    assert errors == []
    assert [len(o) for o in outputs] == [STEPS] * SESSIONS
    assert [s.seq for s in final] == [STEPS] * SESSIONS  # the server's count: none doubled
    expected = cached_reference(model_repo, "lstm", xs)
    np.testing.assert_allclose(np.stack([np.stack(o) for o in outputs]), expected, atol=1e-5)
    print(
        f"replica death: {SESSIONS} sessions x {STEPS} steps, 0 lost, 0 duplicated, "
        f"{replayed} step(s) answered from the stored reply after the kill"
    )
