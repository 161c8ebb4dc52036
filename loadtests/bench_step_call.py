"""Thread CPU of one `StepFunction` call: TensorFlow's public concrete-function call
against the direct op call that `StepFunction` uses (`core/_step.py`, `_DirectTFCall`).

    .venv/bin/python loadtests/bench_step_call.py [--batches 1 4 16 64] [--calls 1000] [--rounds 3]

Both step functions are built in this process from the same reference LSTM(256) over
64 features + Dense(64) (`bench_core.py`), with one compute thread; the public one with
the direct call switched off. For each batch the two take turns for `--rounds` rounds
of `--calls` calls, and each round prints the thread CPU per call (`time.thread_time`,
which a loaded machine disturbs far less than wall time). Nearly all of the difference
is Python under the GIL, which the serving event loop waits for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `loadtests.*` when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rnnserve.core import set_compute_threads

    set_compute_threads(1)
    import keras
    import numpy as np

    import rnnserve.core._step as step_module
    from loadtests.bench_core import reference_model
    from rnnserve.core import StepFunction, from_keras

    keras.utils.set_random_seed(0)
    model = from_keras(reference_model())
    limit = max(args.batches)
    direct = StepFunction(model, max_batch_size=limit)
    direct.warmup()
    original = step_module._direct_tf_call
    step_module._direct_tf_call = lambda *_: None  # the public call only
    try:
        public = StepFunction(model, max_batch_size=limit)
        public.warmup()
    finally:
        step_module._direct_tf_call = original
    rng = np.random.default_rng(0)
    specs = direct.signature
    print("batch  public call (us CPU per round)   direct op (us CPU per round)")
    for batch in args.batches:
        inputs = [rng.normal(size=(batch, *s.shape)).astype(s.dtype) for s in specs.inputs]
        states = [rng.normal(size=(batch, *s.shape)).astype(s.dtype) for s in specs.states]
        rounds: dict[str, list[float]] = {"public": [], "direct": []}
        for _ in range(args.rounds):
            for name, step in (("public", public), ("direct", direct)):
                started = time.thread_time()
                for _ in range(args.calls):
                    step(inputs, (), states)
                rounds[name].append((time.thread_time() - started) / args.calls * 1e6)
        print(
            f"{batch:5d}  {' / '.join(f'{v:.0f}' for v in rounds['public']):>30}"
            f"   {' / '.join(f'{v:.0f}' for v in rounds['direct']):>28}"
        )


if __name__ == "__main__":
    main()
