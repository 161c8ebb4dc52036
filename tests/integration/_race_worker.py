"""One engine in its own process, racing another on the same sessions in Redis.

Run by `test_two_engines_race.py` through multiprocessing (spawn). Writes what it
saw to a pickle file: every accepted step (session, seq after it, input, output),
every replayed retry, and its engine's counters.
"""

from __future__ import annotations

import asyncio
import pickle
import random
from typing import Any

import numpy as np
from _models import FEATURES, lstm_model, step_function


def race_worker(
    worker: int,
    url: str,
    namespace: str,
    weights: str,
    sessions: list[str],
    attempts: int,
    barrier: Any,
    out_path: str,
) -> None:
    from rnnserve.service.engine import RunnerConfig, SessionEngine
    from rnnserve.service.errors import ConcurrentUpdate, SeqConflict
    from rnnserve.service.store import RedisStore

    model = lstm_model()
    model.load_weights(weights)
    step = step_function(model, max_batch_size=64)
    step.warmup()

    async def main() -> dict[str, Any]:
        engine = SessionEngine(RedisStore.from_url(url), namespace=namespace)
        runner = engine.load_model(
            "lstm", "1", step, config=RunnerConfig(max_batch_size=64, max_queue_delay_s=0.001)
        )
        accepted: list[tuple[str, int, np.ndarray, np.ndarray]] = []
        replays: list[tuple[str, int, np.ndarray]] = []
        failures = {"seq_conflict": 0, "concurrent_update": 0}

        async def client(session: str) -> None:
            rng = random.Random(f"{worker}-{session}")
            nrng = np.random.default_rng(abs(hash((worker, session))) % 2**32)
            for k in range(attempts):
                x = nrng.standard_normal(FEATURES).astype("float32")
                use_seq = rng.random() < 0.5
                try:
                    if use_seq:
                        current = (await engine.get("lstm", session)).seq
                        rid = f"w{worker}-{session}-{k}"
                        result = await engine.step(
                            "lstm", session, [x], seq=current, request_id=rid
                        )
                    else:
                        result = await engine.step("lstm", session, [x])
                except SeqConflict:
                    failures["seq_conflict"] += 1
                    continue
                except ConcurrentUpdate:
                    failures["concurrent_update"] += 1
                    continue
                assert not result.replayed
                accepted.append((session, result.seq, x, result.outputs[0]))
                if use_seq and rng.random() < 0.4:  # a client retry of the same step
                    try:
                        again = await engine.step("lstm", session, [x], seq=current, request_id=rid)
                    except SeqConflict:
                        failures["seq_conflict"] += 1  # the other engine moved on meanwhile
                    else:
                        assert again.replayed and again.seq == result.seq
                        replays.append((session, again.seq, again.outputs[0]))
                await asyncio.sleep(rng.random() * 0.002)

        await asyncio.gather(*(client(s) for s in sessions))
        stats = runner.stats
        counters = {
            **failures,
            "applied": stats.applied,
            "cas_retries": stats.cas_retries,
            "replayed": stats.replayed,
            "batches": runner.batcher.stats.batches,
            "max_batch": runner.batcher.stats.max_batch_size,
        }
        await engine.aclose()
        return {"accepted": accepted, "replays": replays, "counters": counters}

    barrier.wait(timeout=300)
    result = asyncio.run(main())
    with open(out_path, "wb") as f:
        pickle.dump(result, f)
