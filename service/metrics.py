"""Every Prometheus collector of rnnserve, and the `/metrics` HTTP endpoint.

Names start with `rnnserve_` and carry their unit; labels are only `model`,
`version`, `method` (the full gRPC method, a fixed set) and `code` (a gRPC status
name): never session or request ids. The hot path never looks a label up: a
`ModelRunner` binds its children once (`RunnerMetrics`), the interceptor once per
method, model and code (`MethodMetrics`).

The call metrics' `model` is bounded: the model a call's first request names when it
is loaded, `_unknown` (`UNKNOWN_MODEL`) for any other name, empty for calls that name
none (health, ListModels, reflection). `rnnserve_models_loaded` has a series with
empty labels at 0 from the process's start (`process_started`), so "no model loaded"
is a 0, not a missing series.

What the session metrics mean (the store expires idle records silently, so no
process sees an expiry happen):

- `rnnserve_sessions_started_total` / `_ended_total`: StartSession (and KServe
  sequence starts) / EndSession calls that removed a session, in this process. Each
  call reaches one process, so the sum over pods is exact.
- `rnnserve_sessions_expired_total`: steps that found their session's record gone:
  expired by the idle timeout (this is when a client notices), or ended or never
  started. The store-side count of expiries is Redis's own `expired_keys`
  (redis_exporter: `redis_expired_keys_total`); docs/deployment.md.
- `rnnserve_sessions_active`: sessions with a step queued or running in this process
  now (the sessions the server is working for, not every session stored).

Several worker processes (`--reuse-port`) share one view when
`PROMETHEUS_MULTIPROC_DIR` names an empty, writable folder before the process
starts (prometheus_client's multiprocess mode: each process writes its samples to
files there; any process's `/metrics` serves the sum). Gauges are per live process
(`livesum` / `livemax`): a process removes its gauge files when it stops, and
`rnnserve serve` removes what dead processes left there before it starts
(`multiproc.py`: the first live process removes dead processes' files).
`--processes N` sets this up by itself (`supervisor.py`: a private folder, one
endpoint served by the supervisor, which removes a dead child's gauges).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from rnnserve.service.multiproc import MULTIPROC_ENV

__all__ = [
    "METRICS",
    "MULTIPROC_ENV",
    "UNKNOWN_MODEL",
    "MethodMetrics",
    "MetricsServer",
    "RunnerMetrics",
    "metric_names",
    "model_loaded",
    "model_unloaded",
    "process_started",
    "request_metrics",
    "session_ended",
    "start_metrics_server",
]

# The call metrics' `model` for a name no loaded model has: the label stays bounded.
UNKNOWN_MODEL: Final = "_unknown"

# Latency buckets (seconds): a step is milliseconds; a stream call can last minutes.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_MODEL = ("model", "version")

# -- gRPC calls (StatusInterceptor) -------------------------------------------------------
REQUESTS = Counter(
    "rnnserve_requests_total",
    "gRPC calls finished, by full method, model and status code (a stream is one call)",
    ("method", "model", "code"),
)
REQUEST_DURATION = Histogram(
    "rnnserve_request_duration_seconds",
    "gRPC call duration, from the handler's start to its last reply, by status code "
    "(refusals such as RESOURCE_EXHAUSTED apart from served calls)",
    ("method", "model", "code"),
    buckets=_LATENCY_BUCKETS,
)

# -- the batch path (ModelRunner) -------------------------------------------------------
STEPS = Counter("rnnserve_steps_total", "steps applied (committed to the store)", _MODEL)
QUEUE_DURATION = Histogram(
    "rnnserve_queue_duration_seconds",
    "a step's wait in the batcher, from submission to its batch's start (first attempt)",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "rnnserve_compute_duration_seconds",
    "one batched model step (in the compute executor)",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
STATE_LOAD_DURATION = Histogram(
    "rnnserve_state_load_duration_seconds",
    "loading one batch's session records from the store (one round trip)",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
STATE_COMMIT_DURATION = Histogram(
    "rnnserve_state_commit_duration_seconds",
    "committing one batch's session records to the store (one compare-and-set script)",
    _MODEL,
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "rnnserve_batch_size_steps",
    "steps in one batch handed to the model runner (retried steps count again)",
    _MODEL,
    buckets=_BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "rnnserve_queue_depth_steps",
    "steps queued in the batcher (ready or behind their session's step in flight)",
    _MODEL,
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "rnnserve_queue_capacity_steps",
    "the batcher's max_queue_size: a step beyond it is refused RESOURCE_EXHAUSTED",
    _MODEL,
    multiprocess_mode="livesum",
)
SESSIONS_ACTIVE = Gauge(
    "rnnserve_sessions_active",
    "sessions with a step queued or running in this process",
    _MODEL,
    multiprocess_mode="livesum",
)
SEQ_CONFLICTS = Counter(
    "rnnserve_seq_conflicts_total", "steps refused: their seq was not the session's", _MODEL
)
REPLAYED = Counter(
    "rnnserve_replayed_steps_total",
    "retried steps answered from the stored reply (exactly-once), not applied again",
    _MODEL,
)
CAS_RETRIES = Counter(
    "rnnserve_cas_retries_total",
    "steps that lost the compare-and-set to another writer and were retried",
    _MODEL,
)
STORE_ERRORS = Counter(
    "rnnserve_store_errors_total",
    "state store calls of the batch path that failed (load or commit)",
    _MODEL,
)

# -- sessions (SessionEngine) -------------------------------------------------------------
SESSIONS_STARTED = Counter("rnnserve_sessions_started_total", "sessions started", _MODEL)
SESSIONS_ENDED = Counter(
    "rnnserve_sessions_ended_total", "EndSession calls that removed a session", ("model",)
)
SESSIONS_EXPIRED = Counter(
    "rnnserve_sessions_expired_total",
    "steps that found their session gone (idle-expired, or ended or never started)",
    _MODEL,
)

# -- models (ModelRepository) ---------------------------------------------------------------
MODEL_LOAD_DURATION = Histogram(
    "rnnserve_model_load_duration_seconds",
    "loading and warming one model version",
    _MODEL,
    buckets=_LOAD_BUCKETS,
)
MODEL_LAST_LOAD_DURATION = Gauge(
    "rnnserve_model_last_load_duration_seconds",
    "how long the last load and warm-up of the model version took",
    _MODEL,
    multiprocess_mode="livemax",
)
MODELS_LOADED = Gauge(
    "rnnserve_models_loaded",
    "1 while the model version is loaded and served (empty labels: 0 from the start)",
    _MODEL,
    multiprocess_mode="livemax",
)

METRICS: Final = (
    REQUESTS,
    REQUEST_DURATION,
    STEPS,
    QUEUE_DURATION,
    COMPUTE_DURATION,
    STATE_LOAD_DURATION,
    STATE_COMMIT_DURATION,
    BATCH_SIZE,
    QUEUE_DEPTH,
    QUEUE_CAPACITY,
    SESSIONS_ACTIVE,
    SEQ_CONFLICTS,
    REPLAYED,
    CAS_RETRIES,
    STORE_ERRORS,
    SESSIONS_STARTED,
    SESSIONS_ENDED,
    SESSIONS_EXPIRED,
    MODEL_LOAD_DURATION,
    MODEL_LAST_LOAD_DURATION,
    MODELS_LOADED,
)


def metric_names() -> dict[str, str]:
    """Every exposed sample name -> its metric's type (`_bucket`, `_sum`, `_count` of
    histograms, `_total` of counters, `_created` of both, as Prometheus sees them)."""
    names: dict[str, str] = {}
    for metric in METRICS:
        for family in metric.describe():
            kind = family.type
            base = family.name
            if kind == "counter":
                names[f"{base}_total"] = names[f"{base}_created"] = kind
            elif kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count", "_created"):
                    names[base + suffix] = kind
            else:
                names[base] = kind
    return names


class RunnerMetrics:
    """The children of one model version, bound once (no label lookups per step)."""

    __slots__ = (
        "batch_size",
        "cas_retries",
        "compute",
        "expired",
        "queue",
        "queue_depth",
        "replayed",
        "seq_conflicts",
        "sessions_active",
        "sessions_started",
        "state_commit",
        "state_load",
        "steps",
        "store_errors",
    )

    def __init__(self, model: str, version: str, *, queue_capacity: int = 0) -> None:
        labels = (model, version)
        QUEUE_CAPACITY.labels(*labels).set(queue_capacity)
        self.steps = STEPS.labels(*labels)
        self.queue = QUEUE_DURATION.labels(*labels)
        self.compute = COMPUTE_DURATION.labels(*labels)
        self.state_load = STATE_LOAD_DURATION.labels(*labels)
        self.state_commit = STATE_COMMIT_DURATION.labels(*labels)
        self.batch_size = BATCH_SIZE.labels(*labels)
        self.queue_depth = QUEUE_DEPTH.labels(*labels)
        self.sessions_active = SESSIONS_ACTIVE.labels(*labels)
        self.seq_conflicts = SEQ_CONFLICTS.labels(*labels)
        self.replayed = REPLAYED.labels(*labels)
        self.cas_retries = CAS_RETRIES.labels(*labels)
        self.store_errors = STORE_ERRORS.labels(*labels)
        self.sessions_started = SESSIONS_STARTED.labels(*labels)
        self.expired = SESSIONS_EXPIRED.labels(*labels)

    def batcher_state(self, queued: int, active_sessions: int) -> None:
        """After each batch: the batcher's queue depth and busy sessions."""
        self.queue_depth.set(queued)
        self.sessions_active.set(active_sessions)


@dataclass(slots=True)
class MethodMetrics:
    """One gRPC method's children: a counter and a duration per model and status code."""

    method: str
    children: dict[tuple[str, str], tuple[Counter, Histogram]]

    def finished(self, model: str, code: str, seconds: float) -> None:
        """`model`: a loaded model's name, `UNKNOWN_MODEL` or "" (the caller bounds it)."""
        children = self.children.get((model, code))
        if children is None:
            children = self.children[model, code] = (
                REQUESTS.labels(self.method, model, code),
                REQUEST_DURATION.labels(self.method, model, code),
            )
        children[0].inc()
        children[1].observe(seconds)


_methods: dict[str, MethodMetrics] = {}
_methods_lock = threading.Lock()


def request_metrics(method: str) -> MethodMetrics:
    """The (cached) children of `method`; gRPC methods are a fixed set."""
    metrics = _methods.get(method)
    if metrics is None:
        with _methods_lock:
            metrics = _methods.get(method)
            if metrics is None:
                metrics = _methods[method] = MethodMetrics(method, {})
    return metrics


def process_started() -> None:
    """`rnnserve_models_loaded` at 0 before any model loads (no model or version label):
    a pod that loads none shows a 0 (alert RnnserveNoModelLoaded), not no series."""
    MODELS_LOADED.labels("", "").set(0)


def model_loaded(model: str, version: str, load_seconds: float) -> None:
    MODEL_LOAD_DURATION.labels(model, version).observe(load_seconds)
    MODEL_LAST_LOAD_DURATION.labels(model, version).set(load_seconds)
    MODELS_LOADED.labels(model, version).set(1)


def model_unloaded(model: str, version: str) -> None:
    # Set, not removed: multiprocess mode cannot remove a sample from the files.
    MODELS_LOADED.labels(model, version).set(0)
    QUEUE_DEPTH.labels(model, version).set(0)
    QUEUE_CAPACITY.labels(model, version).set(0)
    SESSIONS_ACTIVE.labels(model, version).set(0)


def session_ended(model: str) -> None:
    SESSIONS_ENDED.labels(model).inc()


# -- the endpoint -----------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True


class MetricsServer:
    """`/metrics` over HTTP in a daemon thread; `close()` stops it (and, in multiprocess
    mode, removes this process's live gauges)."""

    def __init__(self, httpd: _Server, multiprocess_dir: str | None) -> None:
        self._httpd = httpd
        self._multiprocess_dir = multiprocess_dir
        self.port: int = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="rnnserve-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        if self._multiprocess_dir:
            mark_process_dead(os.getpid(), self._multiprocess_dir)  # type: ignore[no-untyped-call]


def _registry(multiprocess_dir: str | None) -> CollectorRegistry:
    if not multiprocess_dir:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    return registry


def start_metrics_server(
    host: str, port: int, *, reuse_port: bool = False, multiprocess_dir: str | None = None
) -> MetricsServer:
    """Serve `/metrics` on `host:port` (0: a free port; `MetricsServer.port` tells).

    `reuse_port`: SO_REUSEPORT, so worker processes sharing the gRPC port share this
    one too (any of them answers with every process's samples in multiprocess mode).
    `multiprocess_dir` is `PROMETHEUS_MULTIPROC_DIR` as read once at start (`main`).
    """
    handler = MetricsHandler.factory(_registry(multiprocess_dir))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_Server):
        address_family = family
        allow_reuse_port = reuse_port

    return MetricsServer(Server((host, port), handler), multiprocess_dir)
