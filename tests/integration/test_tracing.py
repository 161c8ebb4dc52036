"""OpenTelemetry spans of a real server (Redis store), read from the SDK's in-memory
exporter: a call continues the client's W3C trace; its queue wait is a child linked to
the batch; the batch is a trace of its own, linked to its calls, with state.load,
compute and state.commit in that order; a failed call is marked; JSON log lines carry
the trace id; with tracing off there are no spans and nothing of OpenTelemetry is
imported."""

from __future__ import annotations

import io
import itertools
import json
import logging
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, StatusCode

from rnnserve.service import tracing
from rnnserve.service.logs import configure_logging
from tests.integration._grpc_util import native_stub, pb, pb_grpc, rpc_error, running_server, tensor
from tests.integration._grpc_util import xs as make_xs
from tests.servers import ServerThread, unique

STEP = "rnnserve.v1.Recurrent/Step"
STREAM = "rnnserve.v1.Recurrent/StepStream"


class SystemIds(IdGenerator):
    """Ids from the OS: the tests' autouse seeding of `random` (conftest) would make the
    SDK's default generator repeat ids from one test to the next."""

    def generate_span_id(self) -> int:
        return secrets.randbits(64) or 1

    def generate_trace_id(self) -> int:
        return secrets.randbits(128) or 1


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(id_generator=SystemIds())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.enable(provider)
    yield memory
    tracing.disable()
    provider.shutdown()


@pytest.fixture(scope="module")
def server(
    exporter: InMemorySpanExporter, model_repo: Path, redis_url: str
) -> Iterator[ServerThread]:
    with running_server(model_repo, redis_url=redis_url, tracing=True) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    with channel:
        yield stub


def traceparent() -> tuple[str, int, int]:
    trace_id, span_id = uuid.uuid4().int >> 1, uuid.uuid4().int >> 65
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


def spans_of(exporter: InMemorySpanExporter, trace_id: int, name: str, count: int = 1) -> list:
    """The finished spans named `name` in trace `trace_id` (waits for `count`)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            s
            for s in exporter.get_finished_spans()
            if s.context.trace_id == trace_id and s.name == name
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def batch_of(exporter: InMemorySpanExporter, queued: ReadableSpan) -> ReadableSpan:
    (link,) = queued.links
    found = [s for s in exporter.get_finished_spans() if s.context.span_id == link.context.span_id]
    assert len(found) == 1, found
    return found[0]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (
            s
            for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        ),
        key=lambda s: s.start_time or 0,
    )


def start(stub: Any) -> str:
    session_id = unique("trace")
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id))
    return session_id


def step_request(session_id: str, seq: int | None = None) -> pb.StepRequest:
    return pb.StepRequest(
        model="lstm", session_id=session_id, inputs=[tensor("x", make_xs(1, 1)[0, 0])], seq=seq
    )


def test_a_step_continues_the_clients_trace_through_queue_and_batch(
    stub: Any, exporter: InMemorySpanExporter
) -> None:
    session_id = start(stub)
    header, trace_id, client_span = traceparent()
    stub.Step(step_request(session_id), metadata=[("traceparent", header)])

    (call,) = spans_of(exporter, trace_id, STEP)
    assert call.kind == SpanKind.SERVER
    assert call.parent is not None and call.parent.span_id == client_span
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert call.status.status_code != StatusCode.ERROR

    (queued,) = spans_of(exporter, trace_id, "rnnserve.queue")
    assert queued.parent is not None and queued.parent.span_id == call.context.span_id
    batch = batch_of(exporter, queued)
    assert batch.name == "rnnserve.batch"
    assert batch.context.trace_id != trace_id and batch.parent is None  # a trace of its own
    assert call.context.span_id in {link.context.span_id for link in batch.links}
    assert queued.end_time is not None and batch.start_time is not None
    assert queued.start_time is not None and queued.start_time <= queued.end_time
    assert queued.end_time <= batch.start_time + 1_000_000  # waits end as the batch begins

    stages = children(exporter, batch)
    assert [s.name for s in stages] == ["state.load", "compute", "state.commit"]
    for earlier, later in itertools.pairwise(stages):
        assert earlier.end_time is not None and later.start_time is not None
        assert earlier.end_time <= later.start_time
    assert batch.end_time is not None and stages[-1].end_time is not None
    assert stages[-1].end_time <= batch.end_time
    assert call.end_time is not None and batch.end_time <= call.end_time


def test_every_step_of_a_stream_is_queued_under_the_stream(
    stub: Any, exporter: InMemorySpanExporter
) -> None:
    session_id = start(stub)
    header, trace_id, _ = traceparent()
    replies = list(
        stub.StepStream(
            iter([step_request(session_id, seq=t) for t in range(3)]),
            metadata=[("traceparent", header)],
        )
    )
    assert len(replies) == 3
    (call,) = spans_of(exporter, trace_id, STREAM)
    queued = spans_of(exporter, trace_id, "rnnserve.queue", count=3)
    assert len(queued) == 3
    assert {q.parent.span_id for q in queued if q.parent} == {call.context.span_id}
    batches = {batch_of(exporter, q).context.span_id for q in queued}
    assert len(batches) == 3  # one step of a session per batch


def test_the_rows_of_one_step_many_are_queued_under_its_call(
    stub: Any, exporter: InMemorySpanExporter
) -> None:
    ids = [start(stub) for _ in range(3)]
    header, trace_id, _ = traceparent()
    reply = stub.StepMany(
        pb.StepManyRequest(
            model="lstm", session_ids=ids, inputs=[tensor("x", make_xs(3, 1)[:, 0])]
        ),
        metadata=[("traceparent", header)],
    )
    assert list(reply.codes) == [0, 0, 0]
    (call,) = spans_of(exporter, trace_id, "rnnserve.v1.Recurrent/StepMany")
    queued = spans_of(exporter, trace_id, "rnnserve.queue", count=3)
    assert len(queued) == 3
    assert {q.parent.span_id for q in queued if q.parent} == {call.context.span_id}
    for batch in {
        batch_of(exporter, q).context.span_id: batch_of(exporter, q) for q in queued
    }.values():
        assert call.context.span_id in {link.context.span_id for link in batch.links}


def test_a_failed_call_is_marked(stub: Any, exporter: InMemorySpanExporter) -> None:
    header, trace_id, _ = traceparent()
    error = rpc_error(
        stub.Step, step_request(unique("missing")), metadata=[("traceparent", header)]
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    (call,) = spans_of(exporter, trace_id, STEP)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_json_log_lines_carry_the_trace_id(stub: Any) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("rnnserve").level
    configure_logging("INFO", json_lines=True)
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    status_logger = logging.getLogger("rnnserve.service.interceptor")
    status_logger.setLevel(logging.DEBUG)  # its per-call line, logged inside the call's span
    header, trace_id, _ = traceparent()
    rid = f"rid-{uuid.uuid4().hex[:8]}"
    try:
        stub.StartSession(
            pb.StartSessionRequest(model="lstm", session_id=unique("log")),
            metadata=[("traceparent", header), ("x-request-id", rid)],
        )
    finally:
        status_logger.setLevel(logging.NOTSET)
        root.handlers[:], level, own = saved
        root.setLevel(level)
        logging.getLogger("rnnserve").setLevel(own)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [entry for entry in lines if entry["request_id"] == rid]
    assert mine, lines
    assert {entry.get("trace_id") for entry in mine} == {f"{trace_id:032x}"}


def test_no_spans_when_off(stub: Any, exporter: InMemorySpanExporter) -> None:
    tracing_was = tracing._tracer
    tracing.disable()
    try:
        assert tracing.span("a") is tracing.span("b")  # one shared no-op, no allocation
        assert tracing.batch("x", []) is tracing.span("c")
        assert tracing.current_trace_id() == ""
        before = len(exporter.get_finished_spans())
        header, _, _ = traceparent()
        session_id = start(stub)
        stub.Step(step_request(session_id), metadata=[("traceparent", header)])
        time.sleep(0.2)
        assert len(exporter.get_finished_spans()) == before
    finally:
        tracing._tracer = tracing_was
        tracing.ENABLED = True


def test_without_opentelemetry_off_serves_and_on_names_the_extra(model_repo: Path) -> None:
    """OpenTelemetry absent (every import of it fails): tracing off, the server starts,
    steps and stops; `tracing=True` is a StartupError naming the extra."""
    code = f"""
import asyncio, importlib.abc, sys

class NoOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NoOpenTelemetry())
import grpc
from rnnserve.service import tracing
from rnnserve.service.server import RnnserveServer, StartupError
from rnnserve.service.settings import Settings
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc

def settings(**more):
    return Settings(model_repository={str(model_repo)!r}, port=0, host="127.0.0.1",
                    warmup=False, **more)

async def main():
    server = RnnserveServer(settings())
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        stub = pb_grpc.RecurrentStub(channel)
        await stub.StartSession(pb.StartSessionRequest(model="lstm", session_id="t1"))
    await server.stop(0)
    assert not tracing.ENABLED
    traced = RnnserveServer(settings(tracing=True))
    try:
        await traced.start()
    except StartupError as exc:
        print("error:", exc)
    finally:
        await traced.stop(0)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "error: tracing needs OpenTelemetry: pip install 'rnnserve[tracing]'"
    )
