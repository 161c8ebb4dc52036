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

from rnnserve.service._generated.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.service._generated.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()  # gRPC's sync API must yield to gevent, or users block each other

FEATURES = 64


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="lstm256", help="model to step")
    parser.add_argument("--chunk", type=int, default=16, help="steps per RunSequence call")


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
