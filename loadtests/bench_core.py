"""Steps/s of one recurrent step: StepFunction vs `model.predict` vs an eager call.

    .venv/bin/python loadtests/bench_core.py [--batches 1 32 256 1024] [--rounds 5]

The reference step is an LSTM(256) over 64 features followed by Dense(64),
converted with `from_keras`. Each way of running the step is timed in
interleaved rounds (so machine noise hits all of them alike) and reported as
the median time per call, steps/s (batch / time) and the ratio to
`StepFunction`. "bare tf.function" is the same XLA-compiled step called
directly, without StepFunction's bucketing, padding and checks. Prints a Markdown table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from rnnserve.core import StepFunction, from_keras


def reference_model(features: int = 64, units: int = 256) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((None, features)),
            keras.layers.LSTM(units, return_sequences=True),
            keras.layers.Dense(features),
        ],
        name="lstm256",
    )


def _time_calls(fn: Callable[[], object], min_seconds: float, min_calls: int) -> float:
    """Median seconds per call over a short burst of calls."""
    timings = []
    started = time.perf_counter()
    while len(timings) < min_calls or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - t0)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="per method, per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    recurrent = from_keras(reference_model())
    step_model = recurrent.step_model
    step = StepFunction(recurrent, max_batch_size=max(args.batches))
    # The compiled step with no bucketing, padding or checks: StepFunction's floor.
    direct = tf.function(lambda *xs: step_model(list(xs)), jit_compile=True)
    step_no_xla = StepFunction(recurrent, max_batch_size=max(args.batches), jit_compile=False)
    rng = np.random.default_rng(0)
    results = []
    for batch in args.batches:
        x = rng.normal(size=(batch, 64)).astype("float32")
        h = rng.normal(size=(batch, 256)).astype("float32")
        c = rng.normal(size=(batch, 256)).astype("float32")
        methods: dict[str, Callable[[], object]] = {
            "StepFunction (XLA)": lambda x=x, h=h, c=c: step([x], [], [h, c]),
            "StepFunction (no XLA)": lambda x=x, h=h, c=c: step_no_xla([x], [], [h, c]),
            "bare tf.function (XLA)": lambda x=x, h=h, c=c: [o.numpy() for o in direct(x, h, c)],
            "eager call": lambda x=x, h=h, c=c: [
                keras.ops.convert_to_numpy(o) for o in step_model([x, h, c])
            ],
            "model.predict": lambda x=x, h=h, c=c, batch=batch: step_model.predict(
                [x, h, c], batch_size=batch, verbose=0
            ),
        }
        for fn in methods.values():  # compile / trace outside the timing
            fn()
        per_call: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                per_call[name].append(_time_calls(fn, args.seconds, 3))
        medians = {name: statistics.median(times) for name, times in per_call.items()}
        base = medians["StepFunction (XLA)"]
        for name, seconds in medians.items():
            results.append(
                {
                    "batch": batch,
                    "method": name,
                    "ms_per_call": seconds * 1e3,
                    "steps_per_s": batch / seconds,
                    "x_slower_than_stepfunction": seconds / base,
                }
            )
        print(f"batch {batch}: done", flush=True)

    print()
    print(
        f"LSTM(256) step over 64 features + Dense(64); keras {keras.__version__}, "
        f"backend {keras.backend.backend()}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print()
    print("| batch | method | ms/call | steps/s | StepFunction is x faster |")
    print("|---:|---|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['batch']} | {row['method']} | {row['ms_per_call']:.3f} | "
            f"{row['steps_per_s']:,.0f} | {row['x_slower_than_stepfunction']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
