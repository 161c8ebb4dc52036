"""The event loop's CPU per step, in process (no gRPC): how much Python one served step costs
the engine, for single steps and for StepMany rows.

    .venv/bin/python loadtests/bench_rows.py [--rows 128] [--gateways 2] [--messages 300] \\
        [--redis-url redis://127.0.0.1:6379/0] [--compute-process] [--passes many step kserve]

`gateways` loops each send a message of `rows` sessions' steps (`submit_many`), wait for
it, build the reply message as the servicer does, and send the next; a `step` pass does the
same with `rows` single steps (`submit_step`) per gateway, and a `kserve` pass sends `rows`
KServe `ModelInfer` requests at once through the real servicer (each built as tritonclient
builds it, decoded from bytes, its reply encoded): what a served KServe step costs the
event loop besides gRPC itself. `--passes` picks some of them. Reported: the event loop
thread's CPU time per step (`time.thread_time`, which waiting for the GIL or for the model
does not count, so it moves less with the machine's load than steps/s do), the wall time
per step and steps/s. Same model as bench_grpc (`lstm256`, memory store unless
`--redis-url`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    from loadtests.harness.models import features, write_repository
    from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
    from rnnserve.service.compute import ComputeProcess
    from rnnserve.service.engine import RunnerConfig, SessionEngine
    from rnnserve.service.repository import load_step_function
    from rnnserve.service.store import MemoryStore, RedisStore, StateStore
    from rnnserve.service.wire import decode_named, encode_named

    repo = write_repository(ROOT / "build" / "bench-models", ("lstm256",))
    path = repo / "lstm256" / "1" / "model.keras"
    step = load_step_function(path, 256, warmup=not args.compute_process)
    compute = None
    if args.compute_process:
        compute = ComputeProcess(path, step.signature, max_batch_size=256, name="lstm256")
        await compute.start()
    store: StateStore = MemoryStore()
    if args.redis_url:
        store = RedisStore.from_url(args.redis_url)
    engine = SessionEngine(store, namespace=f"bench-rows-{os.getpid()}")
    engine.load_model("m", "1", step, config=RunnerConfig(), compute=compute)
    k, n_features = args.rows, features("lstm256")
    ids = [[f"g{g}-s{i}" for i in range(k)] for g in range(args.gateways)]
    for group in ids:
        for session_id in group:
            await engine.start("m", session_id)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(k, n_features)).astype("float32")
    tensors = [pb.Tensor(name="x", dtype="float32", shape=[k, n_features], data=x.tobytes())]

    async def many(group: list[str]) -> None:
        pending = engine.submit_many("m", group, decode_named(tensors, role="input"))
        await pending.done
        result = pending.result()
        pb.StepManyResponse(
            session_ids=group,
            codes=[0] * k,
            seqs=result.seqs,
            replayed=result.replayed,
            outputs=encode_named(result.output_specs, result.outputs),
        ).SerializeToString()

    async def steps(group: list[str]) -> None:
        futures = [
            engine.submit_step("m", session_id, {"x": x[i]}) for i, session_id in enumerate(group)
        ]
        for future in futures:
            result = await future
            pb.StepResponse(
                seq=result.seq, outputs=encode_named(result.output_specs, result.outputs)
            ).SerializeToString()

    # KServe ModelInfer through the real servicer, without gRPC: each request as
    # tritonclient builds it, deserialized from bytes (as gRPC hands it over), and the
    # reply serialized.
    from tritonclient.grpc import InferInput
    from tritonclient.grpc._utils import _get_inference_request

    from rnnserve.protocol.inference import grpc_service_pb2 as kserve_pb
    from rnnserve.service.servicers.kserve import InferenceServicer

    servicer = InferenceServicer(engine, ready=lambda: True)
    sequence_ids = {s: 1 + n for n, s in enumerate(s for group in ids for s in group)}

    def kserve_request(session_id: str, row: int, *, start: bool) -> bytes:
        tensor = InferInput("x", [1, n_features], "FP32")
        tensor.set_data_from_numpy(x[row : row + 1])
        return _get_inference_request(
            model_name="m", inputs=[tensor], model_version="", request_id="", outputs=None,
            sequence_id=sequence_ids[session_id], sequence_start=start, sequence_end=False,
            priority=0, timeout=None, parameters=None,
        ).SerializeToString()  # fmt: skip

    wires = {s: kserve_request(s, i, start=False) for group in ids for i, s in enumerate(group)}
    for group in ids:
        for i, session_id in enumerate(group):
            request = kserve_pb.ModelInferRequest.FromString(
                kserve_request(session_id, i, start=True)
            )
            await servicer._infer(request)

    async def kserve(group: list[str]) -> None:
        async def one(session_id: str) -> None:
            request = kserve_pb.ModelInferRequest.FromString(wires[session_id])
            (await servicer._infer(request)).SerializeToString()

        await asyncio.gather(*(one(session_id) for session_id in group))

    passes = {"many": many, "step": steps, "kserve": kserve}
    gc.collect()
    gc.freeze()  # as the server does once its models are loaded
    for name, one in ((name, passes[name]) for name in args.passes):
        for group in ids:
            await one(group)  # warm
        wall0, cpu0 = time.perf_counter(), time.thread_time()

        async def gateway(group: list[str], one=one) -> None:
            for _ in range(args.messages):
                await one(group)

        await asyncio.gather(*(gateway(group) for group in ids))
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        n = k * args.gateways * args.messages
        print(
            f"{name:>6}: event-loop CPU {cpu / n * 1e6:5.1f} us/step, wall {wall / n * 1e6:5.1f} "
            f"us/step, {n / wall:9,.0f} steps/s ({args.gateways} x {k} sessions)",
            flush=True,
        )
    await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="sessions per gateway")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--messages", type=int, default=300, help="messages per gateway")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--compute-process", action="store_true")
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=("many", "step", "kserve"),
        default=["many", "step", "kserve"],
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
