"""The load generator: worker processes, each an asyncio loop of ping-ponging sessions.

A `Job` describes one measurement point: a target address, a mode, a model and the
sessions this worker drives. Every session sends its next step only after the reply to
the previous one (closed loop, one step in flight per session). Modes:

- `step`: unary `rnnserve.v1.Recurrent/Step` (raw stub, one reused request per session);
- `stream`: bidi `StepStream`, `stream_width` sessions multiplexed on each stream;
- `runseq`: unary `RunSequence` with `chunk` steps per call (steps/s counts steps);
- `kserve`: KServe v2 `ModelInfer` via `tritonclient.grpc.aio` with Triton sequence ids;
- `kserve-stream`: KServe `ModelStreamInfer` via `tritonclient.grpc.aio.stream_infer`,
  `stream_width` sequences per stream (tritonserver 2.51 segfaults at >= 128 per stream);
- `many`: bidi `StepManyStream`, a gateway per `many_width` sessions: each message carries
  the next step of all its sessions (columnar), the next message leaves after the reply
  (still one step in flight per session; steps/s counts rows, latency is per message).

The parent (`bench_grpc.py`) starts `workers` processes once and hands each point to all
of them; a worker sets its sessions up, reports ready, waits for the common start time,
then counts only the replies that arrive inside [start + warmup, start + warmup + duration].
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = 64
MODES = ("step", "stream", "runseq", "kserve", "kserve-stream", "many")
NATIVE_MODES = ("step", "stream", "runseq", "many")
SESSIONS_PER_CHANNEL = 64


@dataclass(frozen=True)
class Job:
    address: str
    mode: str
    model: str
    sessions: int  # this worker's sessions
    first_session: int  # global index of this worker's first session
    run_id: str  # unique per point: session ids / sequence ids never repeat across runs
    warmup_s: float
    duration_s: float
    chunk: int = 16
    stream_width: int = 64
    sequence_base: int = 0  # kserve: sequence ids are sequence_base + session index + 1
    features: int = FEATURES  # the model's input size
    many_width: int = 256  # `many`: sessions per StepManyStream message


@dataclass
class Result:
    steps: int = 0
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)


class _Clock:
    """The measurement window, shared by a worker's sessions."""

    def __init__(self, start_at: float, job: Job) -> None:
        self.begin = start_at + job.warmup_s
        self.end = self.begin + job.duration_s
        self.result = Result()
        self.done = 0  # every completed step, for the progress line

    def record(self, t0: float, t1: float, steps: int) -> None:
        self.done += steps
        if self.begin <= t1 <= self.end:
            self.result.steps += steps
            self.result.calls += 1
            self.result.latencies_ms.append((t1 - t0) * 1e3)

    def error(self, exc: BaseException) -> None:
        self.result.errors += 1
        if not self.result.first_error:
            self.result.first_error = f"{type(exc).__name__}: {exc}"[:500]

    @property
    def running(self) -> bool:
        return time.time() < self.end


def _x(rng: np.random.Generator, features: int, steps: int | None = None) -> np.ndarray:
    shape = (features,) if steps is None else (steps, features)
    return rng.normal(size=shape).astype(np.float32)


def _channels(address: str, count: int) -> list[Any]:
    from grpc import aio

    # A local subchannel pool per channel: separate TCP connections, so several server
    # processes sharing the port (SO_REUSEPORT) each get some of them.
    return [
        aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


async def _native(job: Job, clock: _Clock, ready: Any) -> None:
    from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
    from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

    rng = np.random.default_rng(job.first_session)
    ids = [f"{job.run_id}-{job.first_session + i}" for i in range(job.sessions)]
    channels = _channels(job.address, max(1, -(-job.sessions // SESSIONS_PER_CHANNEL)))
    stubs = [pb_grpc.RecurrentStub(c) for c in channels]

    def stub_of(i: int) -> Any:
        return stubs[i // SESSIONS_PER_CHANNEL]

    sem = asyncio.Semaphore(64)

    async def start(i: int) -> None:
        async with sem:
            await stub_of(i).StartSession(
                pb.StartSessionRequest(model=job.model, session_id=ids[i]), timeout=60
            )

    await asyncio.gather(*(start(i) for i in range(job.sessions)))
    x_bytes = [_x(rng, job.features).tobytes() for _ in range(job.sessions)]

    def step_request(i: int) -> Any:
        return pb.StepRequest(
            model=job.model,
            session_id=ids[i],
            inputs=[pb.Tensor(name="x", dtype="float32", shape=[job.features], data=x_bytes[i])],
        )

    start_at = await ready()

    async def unary_session(i: int) -> None:
        stub, request = stub_of(i), step_request(i)
        await _sleep_until(start_at)
        while clock.running:
            t0 = time.time()
            try:
                await stub.Step(request)
            except Exception as exc:
                clock.error(exc)
                await asyncio.sleep(0.01)
                continue
            clock.record(t0, time.time(), 1)

    async def runseq_session(i: int) -> None:
        stub = stub_of(i)
        xs = _x(rng, job.features, job.chunk).tobytes()
        request = pb.RunSequenceRequest(
            model=job.model,
            session_id=ids[i],
            inputs=[pb.Tensor(name="x", dtype="float32", shape=[job.chunk, job.features], data=xs)],
        )
        await _sleep_until(start_at)
        while clock.running:
            t0 = time.time()
            try:
                await stub.RunSequence(request)
            except Exception as exc:
                clock.error(exc)
                await asyncio.sleep(0.01)
                continue
            clock.record(t0, time.time(), job.chunk)

    async def stream_group(members: list[int]) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        waiting: dict[str, asyncio.Future[Any]] = {}

        async def requests() -> Any:
            while (request := await queue.get()) is not None:
                yield request

        call = stub_of(members[0]).StepStream(requests())

        async def read() -> None:
            async for reply in call:
                future = waiting.pop(reply.session_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

        reader = asyncio.ensure_future(read())

        async def session(i: int) -> None:
            request = step_request(i)
            loop = asyncio.get_running_loop()
            await _sleep_until(start_at)
            while clock.running:
                future = loop.create_future()
                waiting[ids[i]] = future
                t0 = time.time()
                queue.put_nowait(request)
                reply = await future
                if reply.HasField("error"):
                    clock.error(RuntimeError(f"{reply.error.code}: {reply.error.message}"))
                    continue
                clock.record(t0, time.time(), 1)

        try:
            await asyncio.gather(*(session(i) for i in members))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 30)

    async def many_gateway(members: list[int]) -> None:
        # One gateway: a StepManyStream whose every message holds one step of each member.
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> Any:
            while (request := await queue.get()) is not None:
                yield request

        x = np.stack([_x(rng, job.features) for _ in members])
        request = pb.StepManyRequest(
            model=job.model,
            session_ids=[ids[i] for i in members],
            inputs=[pb.Tensor(name="x", dtype="float32", shape=list(x.shape), data=x.tobytes())],
        )
        call = stub_of(members[0]).StepManyStream(requests())
        replies = call.__aiter__()
        await _sleep_until(start_at)
        try:
            while clock.running:
                t0 = time.time()
                queue.put_nowait(request)
                reply = await replies.__anext__()
                if reply.HasField("error"):
                    clock.error(RuntimeError(f"{reply.error.code}: {reply.error.message}"))
                    continue
                failed = sum(1 for code in reply.codes if code)
                if failed:
                    first = next(k for k, code in enumerate(reply.codes) if code)
                    clock.error(RuntimeError(f"{failed} row(s) failed: {reply.messages[first]}"))
                clock.record(t0, time.time(), len(members) - failed)
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                async for _ in replies:
                    pass

    try:
        if job.mode == "many":
            width = max(1, job.many_width)
            gateways = [
                list(range(k, min(k + width, job.sessions))) for k in range(0, job.sessions, width)
            ]
            await _bounded(clock, *(many_gateway(g) for g in gateways))
        elif job.mode == "step":
            await _bounded(clock, *(unary_session(i) for i in range(job.sessions)))
        elif job.mode == "runseq":
            await _bounded(clock, *(runseq_session(i) for i in range(job.sessions)))
        else:
            groups = [
                list(range(k, min(k + job.stream_width, job.sessions)))
                for k in range(0, job.sessions, job.stream_width)
            ]
            await _bounded(clock, *(stream_group(g) for g in groups))
        await asyncio.gather(
            *(
                stub_of(i).EndSession(pb.SessionRef(model=job.model, session_id=ids[i]))
                for i in range(job.sessions)
            ),
            return_exceptions=True,
        )
    finally:
        for channel in channels:
            await channel.close()


async def _kserve(job: Job, clock: _Clock, ready: Any) -> None:
    import tritonclient.grpc.aio as tc

    rng = np.random.default_rng(job.first_session)
    n_clients = max(1, -(-job.sessions // SESSIONS_PER_CHANNEL))
    clients = [
        tc.InferenceServerClient(job.address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n_clients)
    ]

    def client_of(i: int) -> Any:
        return clients[i // SESSIONS_PER_CHANNEL]

    def sequence_id(i: int) -> int:
        return job.sequence_base + job.first_session + i + 1

    def inputs(i: int) -> list[Any]:
        x = tc.InferInput("x", [1, job.features], "FP32")
        x.set_data_from_numpy(_x(rng, job.features)[None])
        return [x]

    start_at = await ready()

    async def unary_session(i: int) -> None:
        client, xs, seq = client_of(i), inputs(i), sequence_id(i)
        first = True
        await _sleep_until(start_at)
        while clock.running:
            t0 = time.time()
            try:
                await client.infer(job.model, xs, sequence_id=seq, sequence_start=first)
            except Exception as exc:
                clock.error(exc)
                await asyncio.sleep(0.01)
                continue
            first = False
            clock.record(t0, time.time(), 1)
        if not first:
            with contextlib.suppress(Exception):
                await client.infer(job.model, xs, sequence_id=seq, sequence_end=True)

    async def stream_group(members: list[int]) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        waiting: dict[str, asyncio.Future[Any]] = {}

        async def requests() -> Any:
            while (request := await queue.get()) is not None:
                yield request

        client = client_of(members[0])
        responses = client.stream_infer(inputs_iterator=requests(), stream_timeout=None)

        async def read() -> None:
            async for result, error in responses:
                if error is not None:
                    clock.error(error)
                    # An error reply carries no id we can trust: fail every waiter.
                    for future in list(waiting.values()):
                        if not future.done():
                            future.set_exception(RuntimeError(str(error)))
                    waiting.clear()
                    continue
                future = waiting.pop(result.get_response().id, None)
                if future is not None and not future.done():
                    future.set_result(result)

        reader = asyncio.ensure_future(read())

        async def session(i: int) -> None:
            xs, seq, rid = inputs(i), sequence_id(i), str(sequence_id(i))
            loop = asyncio.get_running_loop()
            first = True
            await _sleep_until(start_at)
            while clock.running:
                future = loop.create_future()
                waiting[rid] = future
                t0 = time.time()
                queue.put_nowait(
                    {
                        "model_name": job.model,
                        "inputs": xs,
                        "request_id": rid,
                        "sequence_id": seq,
                        "sequence_start": first,
                    }
                )
                try:
                    await future
                except Exception:
                    await asyncio.sleep(0.01)
                    continue
                first = False
                clock.record(t0, time.time(), 1)
            if not first:
                future = loop.create_future()
                waiting[rid] = future
                queue.put_nowait(
                    {
                        "model_name": job.model,
                        "inputs": xs,
                        "request_id": rid,
                        "sequence_id": seq,
                        "sequence_end": True,
                    }
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(future, 30)

        try:
            await asyncio.gather(*(session(i) for i in members))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 30)

    try:
        if job.mode == "kserve":
            await _bounded(clock, *(unary_session(i) for i in range(job.sessions)))
        else:
            groups = [
                list(range(k, min(k + job.stream_width, job.sessions)))
                for k in range(0, job.sessions, job.stream_width)
            ]
            await _bounded(clock, *(stream_group(g) for g in groups))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


async def _bounded(clock: _Clock, *coroutines: Any) -> None:
    """Run the sessions; 10 s after the window ends, cancel the ones still in a call (an
    overloaded peer must not hold the run: their late replies would not count anyway)."""
    task = asyncio.ensure_future(asyncio.gather(*coroutines))
    while not task.done():
        if time.time() > clock.end + 10:
            task.cancel()
            break
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _progress(clock: _Clock, counter: Any) -> None:
    while True:
        counter.value = clock.done
        await asyncio.sleep(0.2)


async def run_job(job: Job, counter: Any, ready_queue: Any, start_value: Any, go: Any) -> Result:
    """One measurement point in this worker. `ready()` reports set-up and waits for `go`."""

    async def ready() -> float:
        ready_queue.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start_at = float(start_value.value)
        clock.begin = start_at + job.warmup_s
        clock.end = clock.begin + job.duration_s
        return start_at

    clock = _Clock(float("inf"), job)
    clock.end = float("inf")
    progress = asyncio.ensure_future(_progress(clock, counter))
    try:
        if job.mode in NATIVE_MODES:
            await _native(job, clock, ready)
        else:
            await _kserve(job, clock, ready)
    finally:
        progress.cancel()
        counter.value = clock.done
    return clock.result


def worker_main(
    jobs: Any, results: Any, counter: Any, ready_queue: Any, start_value: Any, go: Any
) -> None:
    """A worker process: run the jobs it is given until it gets None."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    while (job := jobs.get()) is not None:
        counter.value = 0
        try:
            result = asyncio.run(run_job(job, counter, ready_queue, start_value, go))
        except BaseException as exc:
            result = Result(errors=1, first_error="".join(traceback.format_exception(exc))[-2000:])
            ready_queue.put(-1)  # never leave the parent waiting for this worker
        results.put(result)
