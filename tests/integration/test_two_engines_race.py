"""Two engines in two processes stepping the same sessions in Redis (compare-and-set)."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
from _models import offline_run
from _race_worker import race_worker

from rnnserve.service.engine import SessionEngine
from rnnserve.service.store import RedisStore
from tests.redis_servers import MAIN_REDIS_URL

ATOL = 1e-5


@pytest.mark.slow
async def test_two_processes_never_both_advance_a_session(
    main_redis, namespace: str, lstm, tmp_path: Path
) -> None:
    keras_model, step = lstm
    weights = str(tmp_path / "lstm.weights.h5")
    keras_model.save_weights(weights)
    sessions = [f"s{i}" for i in range(24)]
    async with SessionEngine(RedisStore.from_url(MAIN_REDIS_URL), namespace=namespace) as engine:
        engine.load_model("lstm", "1", step)
        for s in sessions:
            await engine.start("lstm", s)

        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        outs = [tmp_path / f"worker{w}.pkl" for w in range(2)]
        procs = [
            ctx.Process(
                target=race_worker,
                args=(w, MAIN_REDIS_URL, namespace, weights, sessions, 25, barrier, str(outs[w])),
            )
            for w in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        assert [p.exitcode for p in procs] == [0, 0]
        results = [pickle.loads(out.read_bytes()) for out in outs]
        counters = [r["counters"] for r in results]
        print("worker counters:", counters)
        assert all(c["applied"] > 0 for c in counters)  # both engines made progress

        for s in sessions:
            steps = [a for r in results for a in r["accepted"] if a[0] == s]
            by_seq = {seq: (x, out) for _, seq, x, out in steps}
            # no seq was reached twice: never two advances from one state
            assert len(by_seq) == len(steps)
            final = await engine.export_state("lstm", s)
            # every accepted step and nothing else: seq == accepted count, no gaps
            assert sorted(by_seq) == list(range(1, final.seq + 1))
            xs = np.stack([by_seq[i][0] for i in range(1, final.seq + 1)])
            want_out, want_states = offline_run(step, xs)
            got_out = np.stack([by_seq[i][1] for i in range(1, final.seq + 1)])
            np.testing.assert_allclose(got_out, want_out, atol=ATOL)
            for got, want in zip(final.states, want_states, strict=True):
                np.testing.assert_allclose(got, want, atol=ATOL)
            for _, seq, out in (p for r in results for p in r["replays"] if p[0] == s):
                np.testing.assert_array_equal(out, by_seq[seq][1])  # replay == original
