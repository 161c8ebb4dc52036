"""Engine steps/s vs concurrent sessions: cross-session batching vs unbatched.

    .venv/bin/python loadtests/bench_engine.py [--sessions 1 16 256 1024] [--seconds 2]
        [--rounds 3] [--redis-url redis://127.0.0.1:6379/0] [--gc-freeze] [--json PATH]

The reference model is the one of `bench_core.py`: LSTM(256) over 64 features
followed by Dense(64), converted with `from_keras`, one `StepFunction` (buckets up to
256, warmed before timing). For each store (memory, Redis) and each number of
concurrent sessions N, N client coroutines in this process each step their own
session in a loop (`SessionEngine.step`, no seq) for `--seconds`; steps/s is all
completed steps over the elapsed time, latency is per step as the client sees it.
The same engine with `max_batch_size=1` (every step its own load, compute and commit)
is the unbatched baseline, run in the same invocation; "x unbatched" is the ratio.
Each point runs `--rounds` times, batched and unbatched alternating (so machine
noise hits both alike); the table shows the median round of each.
Redis keys live under a namespace of their own and are deleted afterwards.
`--gc-freeze` calls `gc.freeze()` after warm-up: TensorFlow and Keras leave a heap of
long-lived objects that every full (generation 2) collection walks, a pause of
hundreds of milliseconds on this VM that lands in the p99; frozen, it is skipped.
Prints a Markdown table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from rnnserve.core import StepFunction, from_keras
from rnnserve.service.engine import RunnerConfig, SessionEngine
from rnnserve.service.store import MemoryStore, RedisStore, StateStore

FEATURES = 64
UNITS = 256


def reference_model() -> keras.Model:
    """The same reference model as bench_core.py."""
    return keras.Sequential(
        [
            keras.Input((None, FEATURES)),
            keras.layers.LSTM(UNITS, return_sequences=True),
            keras.layers.Dense(FEATURES),
        ],
        name="lstm256",
    )


async def measure(
    make_store: Callable[[], StateStore],
    step: StepFunction,
    *,
    sessions: int,
    max_batch_size: int,
    seconds: float,
    namespace: str,
) -> dict[str, Any]:
    config = RunnerConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_s=0.002,
        max_queue_size=max(4096, 2 * sessions),
        max_batches_in_flight=2,
    )
    engine = SessionEngine(make_store(), namespace=namespace)
    runner = engine.load_model("bench", "1", step, config=config)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, FEATURES)).astype("float32")
    latencies: list[float] = []
    done = 0
    stop = False

    async def client(i: int, timed: bool) -> None:
        nonlocal done
        k = i
        while not stop:
            started = time.perf_counter()
            await engine.step("bench", f"s{i}", [inputs[k % 64]])
            if timed:
                latencies.append(time.perf_counter() - started)
                done += 1
            k += 1

    async with engine:
        for first in range(0, sessions, 256):
            await asyncio.gather(
                *(engine.start("bench", f"s{i}") for i in range(first, min(sessions, first + 256)))
            )
        # warm up: a short untimed run (connections, script, buckets in use)
        warm = [asyncio.create_task(client(i, False)) for i in range(sessions)]
        await asyncio.sleep(min(1.0, seconds / 3))
        stop = True
        await asyncio.gather(*warm)
        stop = False
        batches_before = runner.batcher.stats.batches
        requests_before = runner.batcher.stats.requests
        tasks = [asyncio.create_task(client(i, True)) for i in range(sessions)]
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        batches = runner.batcher.stats.batches - batches_before
        requests = runner.batcher.stats.requests - requests_before
        for first in range(0, sessions, 256):
            await asyncio.gather(
                *(engine.end("bench", f"s{i}") for i in range(first, min(sessions, first + 256)))
            )
    latencies.sort()
    return {
        "steps_per_s": done / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": requests / batches if batches else 0.0,
        "steps": done,
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = reference_model()
    step = StepFunction(from_keras(model), max_batch_size=256)
    t0 = time.perf_counter()
    step.warmup()
    print(f"warmed buckets {step.buckets} in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    memory = MemoryStore()
    stores: dict[str, Callable[[], StateStore]] = {"memory": lambda: memory}
    if args.redis_url:
        probe = RedisStore.from_url(args.redis_url)
        await probe.ping()
        await probe.aclose()
        stores["redis"] = lambda: RedisStore.from_url(args.redis_url)
    rows = []
    for store_name, make_store in stores.items():
        for sessions in args.sessions:
            row: dict[str, Any] = {"store": store_name, "sessions": sessions}
            runs: dict[str, list[dict[str, Any]]] = {"unbatched": [], "batched": []}
            for r in range(args.rounds):
                modes = [("unbatched", 1), ("batched", 256)]
                for label, max_batch in modes if r % 2 == 0 else modes[::-1]:
                    runs[label].append(
                        await measure(
                            make_store,
                            step,
                            sessions=sessions,
                            max_batch_size=max_batch,
                            seconds=args.seconds,
                            namespace=namespace,
                        )
                    )
            for label, results in runs.items():
                results.sort(key=lambda result: result["steps_per_s"])
                row[label] = results[len(results) // 2]
                row[label]["rounds_steps_per_s"] = [round(x["steps_per_s"]) for x in results]
            row["ratio"] = row["batched"]["steps_per_s"] / row["unbatched"]["steps_per_s"]
            print(
                f"{store_name:>6} {sessions:>5} sessions: batched "
                f"{row['batched']['steps_per_s']:9.0f}/s (mean batch "
                f"{row['batched']['mean_batch']:.0f}), unbatched "
                f"{row['unbatched']['steps_per_s']:7.0f}/s, x{row['ratio']:.1f}",
                flush=True,
            )
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| store | sessions | batched steps/s | mean batch | p50 / p99 ms | "
        "unbatched steps/s | p50 / p99 ms | x unbatched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        b, u = row["batched"], row["unbatched"]
        lines.append(
            f"| {row['store']} | {row['sessions']} | {b['steps_per_s']:,.0f} | "
            f"{b['mean_batch']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | "
            f"{u['steps_per_s']:,.0f} | {u['p50_ms']:.1f} / {u['p99_ms']:.1f} | "
            f"{row['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="empty to skip the Redis store",
    )
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after warm-up")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"keras {keras.__version__} ({keras.backend.backend()}), model LSTM({UNITS}) over "
        f"{FEATURES} features + Dense({FEATURES}), median of {args.rounds} rounds of "
        f"{args.seconds:g}s per point{', gc frozen' if args.gc_freeze else ''}"
    )
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
