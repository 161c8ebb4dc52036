"""Locust scenario for rnnserve: gRPC users, each sticking to its own session.

    pip install -e '.[loadtests]'
    rnnserve serve --model-repository build/bench-models      # e.g. the bench models
    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 \\
        --headless -u 64 -r 16 -t 60s --model lstm256

Every user starts a session on start (`StartSession`), ends it on stop (`EndSession`) and in
between steps it ping-pong: unary `Step` (`StepUser`), one bidi `StepStream` per user
(`StreamUser`) or `RunSequence` chunks (`SequenceUser`, `--chunk` steps a call). Each RPC
reports to Locust under its own name (`Step`, `StepStream`, `RunSequence`, ...) with
request type `grpc`, its latency and reply size; failures carry the gRPC status. Two custom
metrics are added per RPC in Locust's table: `steps` (session steps a call advanced,
reported as `<RPC> steps` with the steps count as its "response length") and
`seq-gap` failures when a reply's `seq` is not the one the session expected (a lost or
doubled step). Pick users with `--class-picker` or by naming them after `-f ... StepUser`.
"""

from __future__ import annotations

import queue
import time
import uuid
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, between, events, task  # type: ignore[import-not-found]

from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()  # gRPC's sync API must yield to gevent, or users block each other

FEATURES = 64
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="lstm256", help="model to step")
    parser.add_argument("--chunk", type=int, default=16, help="steps per RunSequence call")
    parser.add_argument(
        "--rows",
        type=int,
        default=64,
        env_var="LOCUST_ROWS",
        help="sessions per StepMany message (ManyUser)",
    )


class _SessionUser(User):  # type: ignore[misc]
    abstract = True
    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.model = self.environment.parsed_options.model
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.RecurrentStub(self.channel)
        self.session_id = f"locust-{uuid.uuid4().hex[:16]}"
        self.seq = 0
        x = np.random.default_rng().normal(size=FEATURES).astype(np.float32)
        self.x = pb.Tensor(name="x", dtype="float32", shape=[FEATURES], data=x.tobytes())
        self._call(
            "StartSession",
            self.stub.StartSession,
            pb.StartSessionRequest(model=self.model, session_id=self.session_id),
        )

    def on_stop(self) -> None:
        self._call(
            "EndSession",
            self.stub.EndSession,
            pb.SessionRef(model=self.model, session_id=self.session_id),
        )
        self.channel.close()

    def _fire(self, name: str, started: float, length: int, exc: BaseException | None) -> None:
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1e3,
            response_length=length,
            exception=exc,
            context={"session_id": self.session_id},
        )

    def _call(self, name: str, method: Any, request: Any, steps: int = 0) -> Any:
        started = time.perf_counter()
        try:
            reply = method(request, timeout=60)
        except grpc.RpcError as exc:
            self._fire(name, started, 0, exc)
            return None
        self._fire(name, started, reply.ByteSize(), None)
        if steps:
            self._advance(name, reply.seq, steps)
        return reply

    def _advance(self, name: str, seq: int, steps: int) -> None:
        """Custom metrics: steps advanced, and a failure when the session's seq jumps."""
        expected = self.seq + steps
        self.seq = seq
        events.request.fire(
            request_type="steps",
            name=f"{name} steps",
            response_time=0,
            response_length=steps,
            exception=None if seq == expected else RuntimeError(f"seq-gap: {seq} != {expected}"),
            context={"session_id": self.session_id},
        )


class StepUser(_SessionUser):
    """Unary `Step`, one step in flight per user."""

    @task
    def step(self) -> None:
        self._call(
            "Step",
            self.stub.Step,
            pb.StepRequest(model=self.model, session_id=self.session_id, inputs=[self.x]),
            steps=1,
        )


class SequenceUser(_SessionUser):
    """`RunSequence`, `--chunk` steps per call."""

    @task
    def run_sequence(self) -> None:
        chunk = self.environment.parsed_options.chunk
        xs = pb.Tensor(name="x", dtype="float32", shape=[chunk, FEATURES], data=self.x.data * chunk)
        self._call(
            "RunSequence",
            self.stub.RunSequence,
            pb.RunSequenceRequest(model=self.model, session_id=self.session_id, inputs=[xs]),
            steps=chunk,
        )


class StreamUser(_SessionUser):
    """One bidi `StepStream` per user for its whole life; each reply is one sample."""

    def on_start(self) -> None:
        super().on_start()
        self.requests: queue.Queue[Any] = queue.Queue()

        def feed() -> Any:
            while (request := self.requests.get()) is not None:
                yield request

        self.replies = self.stub.StepStream(feed())

    def on_stop(self) -> None:
        self.requests.put(None)
        super().on_stop()

    @task
    def step(self) -> None:
        started = time.perf_counter()
        self.requests.put(
            pb.StepRequest(model=self.model, session_id=self.session_id, inputs=[self.x])
        )
        try:
            reply = next(self.replies)
        except (grpc.RpcError, StopIteration) as exc:
            self._fire("StepStream", started, 0, exc)
            self.stop()
            return
        if reply.HasField("error"):
            self._fire("StepStream", started, 0, RuntimeError(reply.error.message))
            return
        self._fire("StepStream", started, reply.ByteSize(), None)
        self._advance("StepStream", reply.seq, 1)


class ManyUser(_SessionUser):
    """A gateway: `--rows` sessions, stepped together by unary `StepMany` messages."""

    def on_start(self) -> None:
        self.model = self.environment.parsed_options.model
        self.rows = self.environment.parsed_options.rows
        self.request_name = f"StepMany[{self.rows}]"
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.RecurrentStub(self.channel)
        self.session_id = f"locust-{uuid.uuid4().hex[:16]}"  # the prefix of the rows' ids
        self.session_ids = [f"{self.session_id}-{k}" for k in range(self.rows)]
        self.seqs = [0] * self.rows
        xs = np.random.default_rng().normal(size=(self.rows, FEATURES)).astype(np.float32)
        self.xs = pb.Tensor(name="x", dtype="float32", shape=list(xs.shape), data=xs.tobytes())
        for session_id in self.session_ids:
            self._call(
                "StartSession",
                self.stub.StartSession,
                pb.StartSessionRequest(model=self.model, session_id=session_id),
            )

    def on_stop(self) -> None:
        for session_id in self.session_ids:
            self._call(
                "EndSession",
                self.stub.EndSession,
                pb.SessionRef(model=self.model, session_id=session_id),
            )
        self.channel.close()

    @task
    def step_many(self) -> None:
        request = pb.StepManyRequest(
            model=self.model, session_ids=self.session_ids, inputs=[self.xs]
        )
        started = time.perf_counter()
        try:
            reply = self.stub.StepMany(request, timeout=60)
        except grpc.RpcError as exc:
            self._fire(self.request_name, started, 0, exc)
            return
        failed = [k for k, code in enumerate(reply.codes) if code]
        error = None
        if failed:  # named by the rows' statuses only, so Locust's table keeps one line each
            names = sorted({CODE_NAMES.get(reply.codes[k], str(reply.codes[k])) for k in failed})
            error = RuntimeError(f"row(s) failed: {', '.join(names)}")
        self._fire(self.request_name, started, reply.ByteSize(), error)
        # The steps entry: rows applied, and a seq-gap failure if any row's seq jumped.
        gaps = []
        for k, code in enumerate(reply.codes):
            if code:
                continue
            expected = self.seqs[k] + 1
            self.seqs[k] = reply.seqs[k]
            if reply.seqs[k] != expected:
                gaps.append(f"{reply.seqs[k]} != {expected}")
        events.request.fire(
            request_type="steps",
            name=f"{self.request_name} steps",
            response_time=0,
            response_length=self.rows - len(failed),
            exception=RuntimeError(f"seq-gap: {gaps[0]}") if gaps else None,
            context={"session_id": self.session_id},
        )
