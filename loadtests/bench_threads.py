"""CPU and wall time of one model step by the number of threads it may use.

    .venv/bin/python loadtests/bench_threads.py [--threads 1 2] [--batches 1 8 32 256 1024]

`rnnserve serve --compute-threads N` caps TensorFlow's intra-op pool, which is fixed
once the runtime starts, so each setting runs in a process of its own; the settings
take turns over `--rounds` rounds (machine noise hits all alike) and the figures are
medians over the rounds. For each batch: wall ms per call (what a batch's latency
pays) and CPU ms per call (process time: what the step takes from the event loop
and the other requests on a small machine). The step is StepFunction on the
reference LSTM(256) over 64 features + Dense(64), as in `bench_core.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `loadtests.*` when run as a script


def measure(threads: int, batches: list[int], seconds: float) -> dict[int, tuple[float, float]]:
    """In this process: {batch: (wall ms, cpu ms) per call}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rnnserve.core import set_compute_threads

    if threads and not set_compute_threads(threads):
        raise SystemExit(f"could not set {threads} compute thread(s)")
    import keras
    import numpy as np

    from loadtests.bench_core import reference_model
    from rnnserve.core import StepFunction, from_keras

    keras.utils.set_random_seed(0)
    step = StepFunction(from_keras(reference_model()), max_batch_size=max(batches))
    rng = np.random.default_rng(0)
    out: dict[int, tuple[float, float]] = {}
    for batch in batches:
        x = rng.normal(size=(batch, 64)).astype("float32")
        h = rng.normal(size=(batch, 256)).astype("float32")
        c = rng.normal(size=(batch, 256)).astype("float32")
        for _ in range(5):
            step([x], [], [h, c])
        calls = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while calls < 5 or time.perf_counter() - wall0 < seconds:
            step([x], [], [h, c])
            calls += 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        out[batch] = (wall / calls * 1e3, cpu / calls * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per batch, per round")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.batches, args.seconds)))
        return

    runs: dict[int, list[dict[str, list[float]]]] = {t: [] for t in args.threads}
    for round_ in range(args.rounds):
        for threads in args.threads:
            command = [
                sys.executable, __file__, "--child", str(threads), "--seconds", str(args.seconds),
                "--batches", *map(str, args.batches),
            ]  # fmt: skip
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            runs[threads].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {threads} thread(s) done", file=sys.stderr)
    print(f"\n{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| batch | threads | wall ms/call | CPU ms/call | CPU / wall |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for threads in args.threads:
            wall = statistics.median(r[str(batch)][0] for r in runs[threads])
            cpu = statistics.median(r[str(batch)][1] for r in runs[threads])
            print(f"| {batch} | {threads} | {wall:.3f} | {cpu:.3f} | {cpu / wall:.2f} |")


if __name__ == "__main__":
    main()
