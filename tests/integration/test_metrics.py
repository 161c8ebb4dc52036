"""`/metrics` scraped over real HTTP after real traffic through a real server.

Every check is a difference between two scrapes (the collectors are per process and
other tests in this process move them too), and every expected amount follows from
the traffic sent: N steps -> +N calls and +N applied steps, the batch size
histogram's sum +N, one replayed retry -> +1, and so on.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from _grpc_util import FEATURES, native_stub, pb, rpc_error, running_server, tensor
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.service.errors import RnnserveError, SeqConflict, SessionNotFound, StoreUnavailable
from rnnserve.service.logs import JsonFormatter, configure_logging
from rnnserve.service.metrics import metric_names
from rnnserve.service.server import NATIVE_SERVICE
from rnnserve.service.settings import Settings
from tests.ports import free_port
from tests.redis_servers import RedisProcess
from tests.servers import ServerThread, spawn_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LSTM = {"model": "lstm", "version": "1"}


def method(name: str) -> str:
    return f"/{NATIVE_SERVICE}/{name}"


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Delta:
    """`delta(name, **labels)`: how much a sample moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def x(seed: int) -> pb.Tensor:
    rng = np.random.default_rng(seed)
    return tensor("x", rng.normal(size=FEATURES).astype("float32"))


def code_of(error_class: type[RnnserveError]) -> str:
    return str(error_class.code)


@pytest.fixture(scope="module")
def metered(model_repo: Path) -> Iterator[tuple[grpc.Channel, object, int]]:
    with running_server(model_repo, metrics_port=0) as server:
        channel, stub = native_stub(server.address)
        with channel:
            yield channel, stub, server.server.metrics.port


def test_every_exposed_metric_is_declared_in_metrics_py(metered) -> None:
    _, _, port = metered
    declared = metric_names()
    exposed = {name for name, _ in scrape(port) if name.startswith("rnnserve_")}
    assert exposed <= set(declared), exposed - set(declared)
    # the model-level series exist once the models are loaded
    samples = scrape(port)
    assert value(samples, "rnnserve_models_loaded", **LSTM) == 1
    assert value(samples, "rnnserve_model_load_duration_seconds_count", **LSTM) >= 1
    # the last load's duration is a gauge (the dashboard's "last load time")
    last = value(samples, "rnnserve_model_last_load_duration_seconds", **LSTM)
    assert 0 < last <= value(samples, "rnnserve_model_load_duration_seconds_sum", **LSTM)
    # 0 from the start, without model labels (Prometheus drops empty ones): a pod with
    # no model has a series whose max is 0 (alert RnnserveNoModelLoaded)
    assert samples[("rnnserve_models_loaded", frozenset({"model": "", "version": ""}.items()))] == 0
    capacity = Settings.model_fields["max_queue_size"].default  # config.yaml leaves it
    assert value(samples, "rnnserve_queue_capacity_steps", **LSTM) == capacity


def test_steps_move_request_step_batch_and_duration_metrics(metered) -> None:
    _, stub, port = metered
    sessions = [f"m-{uuid.uuid4().hex[:10]}" for _ in range(16)]
    rounds = 4
    n = len(sessions) * rounds
    before = scrape(port)
    for sid in sessions:
        stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=sid))
    for t in range(rounds):  # each round: every session's step at once (they batch)
        futures = [
            stub.Step.future(pb.StepRequest(model="lstm", session_id=sid, inputs=[x(t)], seq=t))
            for sid in sessions
        ]
        assert [f.result().seq for f in futures] == [t + 1] * len(sessions)
    for sid in sessions[:3]:
        stub.EndSession(pb.SessionRef(model="lstm", session_id=sid))
    delta = Delta(before, scrape(port))

    assert delta("rnnserve_requests_total", method=method("Step"), model="lstm", code="OK") == n
    assert (
        delta(
            "rnnserve_request_duration_seconds_count",
            method=method("Step"),
            model="lstm",
            code="OK",
        )
        == n
    )
    assert (
        delta("rnnserve_requests_total", method=method("StartSession"), model="lstm", code="OK")
        == 16
    )
    assert delta("rnnserve_steps_total", **LSTM) == n
    assert delta("rnnserve_sessions_started_total", **LSTM) == 16
    assert delta("rnnserve_sessions_ended_total", model="lstm") == 3
    # every step is in exactly one batch (no retries here)
    assert delta("rnnserve_batch_size_steps_sum", **LSTM) == n
    batches = delta("rnnserve_batch_size_steps_count", **LSTM)
    assert rounds <= batches <= n
    assert delta("rnnserve_queue_duration_seconds_count", **LSTM) == n
    for stage in ("compute", "state_load", "state_commit"):
        assert delta(f"rnnserve_{stage}_duration_seconds_count", **LSTM) == batches, stage
        assert delta(f"rnnserve_{stage}_duration_seconds_sum", **LSTM) > 0, stage
    # the last batch left the batcher empty
    after = delta.after
    assert value(after, "rnnserve_queue_depth_steps", **LSTM) == 0
    assert value(after, "rnnserve_sessions_active", **LSTM) == 0


def test_replays_conflicts_and_missing_sessions_are_counted(metered) -> None:
    _, stub, port = metered
    sid = f"r-{uuid.uuid4().hex[:10]}"
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=sid))
    before = scrape(port)
    first = pb.StepRequest(model="lstm", session_id=sid, inputs=[x(1)], seq=0, request_id="a")
    assert not stub.Step(first).replayed
    assert stub.Step(first).replayed  # the same step again: answered from the record
    stale = pb.StepRequest(model="lstm", session_id=sid, inputs=[x(2)], seq=0, request_id="b")
    assert rpc_error(stub.Step, stale).code().name == code_of(SeqConflict)
    gone = pb.StepRequest(model="lstm", session_id="never-started", inputs=[x(3)])
    assert rpc_error(stub.Step, gone).code().name == code_of(SessionNotFound)
    delta = Delta(before, scrape(port))

    assert delta("rnnserve_replayed_steps_total", **LSTM) == 1
    assert delta("rnnserve_seq_conflicts_total", **LSTM) == 1
    assert delta("rnnserve_sessions_expired_total", **LSTM) == 1
    assert delta("rnnserve_steps_total", **LSTM) == 1
    step = method("Step")
    assert delta("rnnserve_requests_total", method=step, model="lstm", code="OK") == 2
    assert (
        delta("rnnserve_requests_total", method=step, model="lstm", code=code_of(SeqConflict)) == 1
    )
    assert (
        delta("rnnserve_requests_total", method=step, model="lstm", code=code_of(SessionNotFound))
        == 1
    )
    assert delta("rnnserve_batch_size_steps_sum", **LSTM) == 4


def test_call_metrics_name_the_model_bounded_to_the_loaded_ones(metered) -> None:
    _, stub, port = metered
    sid = f"n-{uuid.uuid4().hex[:10]}"
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=sid))
    before = scrape(port)
    for name in ("nope-1", "nope-2"):  # any name a client sends: one `_unknown` series
        error = rpc_error(stub.GetModelSignature, pb.GetModelSignatureRequest(model=name))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    stub.ListModels(pb.ListModelsRequest())  # names no model
    stub.GetSession(pb.SessionRef(model="lstm", session_id=sid))
    stub.ResetSession(pb.ResetSessionRequest(session=pb.SessionRef(model="lstm", session_id=sid)))
    steps = [pb.StepRequest(model="lstm", session_id=sid, inputs=[x(t)]) for t in range(3)]
    assert len(list(stub.StepStream(iter(steps)))) == 3  # one call
    after = scrape(port)
    delta = Delta(before, after)

    total = "rnnserve_requests_total"
    signature = method("GetModelSignature")
    assert delta(total, method=signature, model="_unknown", code="NOT_FOUND") == 2
    assert delta(total, method=method("ListModels"), model="", code="OK") == 1
    assert delta(total, method=method("GetSession"), model="lstm", code="OK") == 1
    assert delta(total, method=method("ResetSession"), model="lstm", code="OK") == 1
    assert delta(total, method=method("StepStream"), model="lstm", code="OK") == 1
    assert delta("rnnserve_request_duration_seconds_count", method=method("StepStream"),
                 model="lstm", code="OK") == 1  # fmt: skip
    # Bounded: a name no loaded model has never becomes a series of its own (the other
    # labels are the models this process's tests have loaded).
    models = {dict(labels).get("model") for name, labels in after if name == total}
    assert not models & {"nope-1", "nope-2"}, models


def test_a_process_whose_every_version_is_removed_reports_no_model_loaded(
    model_repo: Path, tmp_path: Path
) -> None:
    """The limit RnnserveNoModelLoaded works with (docs/deployment.md): a server that
    loads nothing at start exits, one whose versions are all removed later stays up with
    every `rnnserve_models_loaded` series at 0. A process of its own, as a pod is."""
    repo = tmp_path / "models"
    shutil.copytree(model_repo, repo)
    metrics_port = free_port()
    process, _ = spawn_server(
        repo, "--metrics-port", str(metrics_port), "--repository-poll-s", "0.2",
        env={"RNNSERVE_WARMUP": "false"},
    )  # fmt: skip

    def loaded() -> dict[frozenset[tuple[str, str]], float]:
        return {k: v for (n, k), v in scrape(metrics_port).items() if n == "rnnserve_models_loaded"}

    try:
        assert max(loaded().values()) == 1
        for model in ("lstm", "ctx"):
            shutil.rmtree(repo / model)
        deadline = time.monotonic() + 30
        while max(loaded().values()) != 0:
            assert time.monotonic() < deadline, loaded()
            time.sleep(0.1)
        assert process.poll() is None  # still up: only the alert can tell
        series = loaded()
        assert frozenset({"model": "", "version": ""}.items()) in series
        assert series[frozenset(LSTM.items())] == 0
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_store_errors_with_a_dead_redis(model_repo: Path, redis_server: RedisProcess) -> None:
    settings = Settings(
        model_repository=model_repo,
        port=0,
        host="127.0.0.1",
        redis_url=redis_server.url,
        metrics_port=0,
        warmup=False,  # (this test needs no compiled buckets)
    )
    with ServerThread(settings) as server:
        port = server.server.metrics.port
        channel, stub = native_stub(server.address)
        with channel:
            sid = "dead-redis"
            stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=sid))
            stub.Step(pb.StepRequest(model="lstm", session_id=sid, inputs=[x(0)]))
            before = scrape(port)
            redis_server.kill()
            error = rpc_error(
                stub.Step, pb.StepRequest(model="lstm", session_id=sid, inputs=[x(1)])
            )
            assert error.code().name == code_of(StoreUnavailable)
            delta = Delta(before, scrape(port))
    assert delta("rnnserve_store_errors_total", **LSTM) == 1
    assert delta("rnnserve_steps_total", **LSTM) == 0
    assert (
        delta(
            "rnnserve_requests_total",
            method=method("Step"),
            model="lstm",
            code=code_of(StoreUnavailable),
        )
        == 1
    )


def test_request_ids_flow_into_json_log_lines(metered) -> None:
    _, stub, _ = metered
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", json_lines=True)  # the handler `serve` installs
    handler = root.handlers[0]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    status_logger = logging.getLogger("rnnserve.service.interceptor")
    status_logger.setLevel(logging.DEBUG)
    rid = f"rid-{uuid.uuid4().hex[:8]}"
    try:
        sid = f"l-{uuid.uuid4().hex[:10]}"
        stub.StartSession(
            pb.StartSessionRequest(model="lstm", session_id=sid),
            metadata=[("x-request-id", rid)],
        )
    finally:
        status_logger.setLevel(logging.NOTSET)
        root.handlers[:], level = saved
        root.setLevel(level)
    assert isinstance(handler.formatter, JsonFormatter)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [e for e in lines if e["request_id"] == rid]
    assert mine, lines
    assert any(method("StartSession") in e["message"] and "OK" in e["message"] for e in mine)


def test_two_processes_share_one_metrics_port_in_multiprocess_mode(
    model_repo: Path, tmp_path: Path
) -> None:
    """Two `rnnserve serve --reuse-port` processes, one PROMETHEUS_MULTIPROC_DIR, one
    metrics port: whichever answers the scrape reports both processes' steps."""
    metrics_port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "RNNSERVE_WARMUP": "false"}
    args = ("--reuse-port", "true", "--metrics-port", str(metrics_port))
    spawned: list[tuple[object, int]] = []
    errors: list[BaseException] = []

    def spawn() -> None:
        try:
            spawned.append(spawn_server(model_repo, *args, env=env))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spawn) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        counts = (3, 5)
        for (_, port), n in zip(spawned, counts, strict=True):
            channel, stub = native_stub(f"127.0.0.1:{port}")
            with channel:
                stub.StartSession(pb.StartSessionRequest(model="lstm", session_id="mp"))
                for t in range(n):
                    stub.Step(pb.StepRequest(model="lstm", session_id="mp", inputs=[x(t)]))
        for _ in range(4):  # several connections: the kernel may pick either process
            samples = scrape(metrics_port)
            assert value(samples, "rnnserve_steps_total", **LSTM) == sum(counts)
            assert value(samples, "rnnserve_sessions_started_total", **LSTM) == 2
            assert value(samples, "rnnserve_models_loaded", **LSTM) == 1  # livemax
            step_ok = value(
                samples, "rnnserve_requests_total", method=method("Step"), model="lstm", code="OK"
            )
            assert step_ok == sum(counts)
    finally:
        for process, _ in spawned:
            process.terminate()  # type: ignore[attr-defined]
        for process, _ in spawned:
            process.wait(timeout=60)  # type: ignore[attr-defined]
    # a stopped process removes its live gauges; its counters stay (the sum must not drop)
    assert not list(tmp_path.glob("gauge_live*")), list(tmp_path.iterdir())
    assert list(tmp_path.glob("counter_*.db"))
