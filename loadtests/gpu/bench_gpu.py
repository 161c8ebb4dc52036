"""GPU step throughput (issue 6) for the `device` tool's H100: NOT RUN YET.

Written without a device (none was lent to the session that wrote it): expect to fix
small things on the first run. Keras on the JAX backend (TensorFlow is not on that
machine). For LSTM(1024) over 256 features + Dense(256), at batch 1..4096:

- `StepFunction` (numpy in, numpy out: states cross host <-> device every call, as in
  the server today);
- the bare jitted step on device-resident arrays (`jax.jit` of `stateless_call`,
  `block_until_ready`): compute alone;
- the host -> device -> host round trip of the states alone (float32 and float16).

    KERAS_BACKEND=jax python loadtests/gpu/bench_gpu.py [--batches 1 64 1024 4096]

On the device machine (Python 3.12) `loadtests/gpu/device.sh` runs it, with the wheels
that `loadtests/gpu/fetch_wheels.sh` prepares, and then the full server (see there).
Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import keras
import numpy as np

from rnnserve.core import StepFunction, from_keras


def _median_s(fn, calls: int = 50) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 1024, 4096])
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None, 256)),
            keras.layers.LSTM(args.units, return_sequences=True),
            keras.layers.Dense(256),
        ]
    )
    recurrent = from_keras(model)
    step_model = recurrent.step_model
    step = StepFunction(recurrent, max_batch_size=max(args.batches))
    trainable = [v.value for v in step_model.trainable_variables]
    non_trainable = [v.value for v in step_model.non_trainable_variables]

    @jax.jit
    def bare(x, h, c):
        outputs, _ = step_model.stateless_call(trainable, non_trainable, [x, h, c])
        return outputs

    rows = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = rng.normal(size=(batch, 256)).astype("float32")
        h = rng.normal(size=(batch, args.units)).astype("float32")
        c = h.copy()
        dx, dh, dc = (jax.device_put(a) for a in (x, h, c))
        row = {"batch": batch, "device": str(jax.devices()[0])}
        row["step_function_s"] = _median_s(lambda: step([x], [], [h, c]))  # noqa: B023
        row["bare_jit_s"] = _median_s(
            lambda: jax.block_until_ready(bare(dx, dh, dc))  # noqa: B023
        )
        for dtype in ("float32", "float16"):
            hs = [h.astype(dtype), c.astype(dtype)]
            row[f"states_roundtrip_{dtype}_s"] = _median_s(
                lambda hs=hs: [np.asarray(jax.device_put(a)) for a in hs]
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| batch | StepFunction steps/s | bare jit steps/s | states h->d->h f32 / f16 ms |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['batch'] / r['step_function_s']:,.0f} | "
            f"{r['batch'] / r['bare_jit_s']:,.0f} | "
            f"{r['states_roundtrip_float32_s'] * 1e3:.2f} / {r['states_roundtrip_float16_s'] * 1e3:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
