"""Two replicas sharing one Redis: the first is SIGKILLed mid-sequence and the
client's session carries on on the second, every step applied exactly once."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import redis

from rnnserve.client import Client, RetryPolicy
from tests.models import FEATURES, reference
from tests.servers import ServerThread, close_output, spawn_server


def test_killed_replica_the_session_continues_on_the_next(model_repo, redis_url):
    from rnnserve.service.settings import Settings

    namespace = f"test-failover-{uuid.uuid4().hex[:12]}"
    first, first_port = spawn_server(
        model_repo,
        "--redis-url",
        redis_url,
        env={"RNNSERVE_NAMESPACE": namespace, "RNNSERVE_WARMUP": "false"},
    )
    second = ServerThread(
        Settings(
            model_repository=model_repo,
            port=0,
            host="127.0.0.1",
            redis_url=redis_url,
            namespace=namespace,
            warmup=False,
        )
    )
    xs = np.random.default_rng(7).normal(size=(24, FEATURES)).astype("float32")
    try:
        with second:
            retry = RetryPolicy(attempts=8, initial_backoff_s=0.02, max_backoff_s=0.2)
            with Client([f"127.0.0.1:{first_port}", second.address], retry=retry) as client:
                session = client.session("lstm")
                outputs = [session.step(xs[t]) for t in range(8)]
                assert client.address.endswith(f":{first_port}")
                # Kill the first replica while the next step is on its way.
                killer = threading.Thread(target=first.kill)
                killer.start()
                outputs.extend(session.step(xs[t]) for t in range(8, 16))
                killer.join()
                assert first.wait(timeout=30) != 0
                assert client.address == second.address
                outputs.extend(session.run(xs[16:]))  # a sequence call on the survivor

                assert session.seq == 24
                assert client.attach("lstm", session.session_id).seq == 24
                session.end()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
        close_output(first)
        store = redis.Redis.from_url(redis_url)
        keys = list(store.scan_iter(match=f"rnnserve:{namespace}:*"))
        if keys:
            store.delete(*keys)
        store.close()
    # Every acknowledged step applied once, in order: no step lost, none doubled.
    expected = reference(model_repo, "lstm", xs[None])[0]
    np.testing.assert_allclose(np.stack(outputs), expected, atol=1e-5)
