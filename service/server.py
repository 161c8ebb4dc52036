"""The gRPC server: engine + state store + model repository + servicers, with a lifecycle.

    server = RnnserveServer(settings)
    port = await server.start()      # loads and warms the models, then SERVING
    await server.wait()              # until stop() (SIGTERM/SIGINT in `serve`)
    await server.stop()              # NOT_SERVING, finish in-flight calls and batches

Health (`grpc.health.v1`) reports NOT_SERVING until every model of the repository
is loaded and warmed and the state store answers, and from the moment a drain starts,
so Kubernetes stops routing before the server stops accepting. The served services
(not "", which liveness reads) are NOT_SERVING too whenever no model is loaded or the
store stops answering (checked every `health_check_s`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import platform
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from rnnserve.core import set_compute_threads
from rnnserve.protocol.inference import grpc_service_pb2 as kserve_pb2
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kserve_grpc
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service import tracing
from rnnserve.service.auth import TokenAuth
from rnnserve.service.engine import SessionEngine
from rnnserve.service.errors import RnnserveError
from rnnserve.service.interceptor import StatusInterceptor
from rnnserve.service.metrics import (
    MULTIPROC_ENV,
    MetricsServer,
    process_started,
    start_metrics_server,
)
from rnnserve.service.repository import ModelRepository
from rnnserve.service.servicers.kserve import InferenceServicer, rnnserve_version
from rnnserve.service.servicers.native import RecurrentServicer
from rnnserve.service.settings import Settings, auto_compute_threads, available_cpus, redact_url
from rnnserve.service.store import (
    MemoryStore,
    RedisClusterStore,
    RedisStore,
    StateStore,
    parse_sentinels,
)

logger = logging.getLogger(__name__)

NATIVE_SERVICE = pb.DESCRIPTOR.services_by_name["Recurrent"].full_name
KSERVE_SERVICE = kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME
SERVICES = (NATIVE_SERVICE, KSERVE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE)
SERVER_NAME = "rnnserve"


def make_store(settings: Settings) -> StateStore:
    socket_s = settings.redis_timeout_s
    common: dict[str, Any] = {
        "socket_timeout_s": socket_s,
        "op_timeout_s": 2.5 * socket_s,
        "min_replicas_ack": settings.redis_min_replicas_ack,
        "replicas_ack_timeout_ms": settings.redis_replicas_ack_timeout_ms,
    }
    if settings.redis_sentinel and settings.redis_service:
        sentinels = parse_sentinels(settings.redis_sentinel)
        return RedisStore.from_sentinel(sentinels, settings.redis_service, **common)
    if settings.redis_url and settings.redis_cluster:
        return RedisClusterStore.from_url(settings.redis_url, **common)
    if settings.redis_url:
        return RedisStore.from_url(settings.redis_url, **common)
    return MemoryStore()


def describe_store(settings: Settings) -> str:
    """The state store `make_store` makes, in words for the start log (no password)."""
    if settings.redis_sentinel:
        where = (
            f"Redis via Sentinel {settings.redis_sentinel} (service {settings.redis_service}, "
            "the master a majority of them agree on)"
        )
    elif settings.redis_url:
        kind = "Redis Cluster (seed node)" if settings.redis_cluster else "Redis"
        where = f"{kind} at {redact_url(settings.redis_url)}"
    else:
        return "memory (in this process: sessions do not survive a restart and are not shared)"
    n = settings.redis_min_replicas_ack
    acks = (
        f"every write waits for {n} replica(s) (up to {settings.redis_replicas_ack_timeout_ms} ms)"
        if n
        else "writes are not waited for on replicas (redis_min_replicas_ack 0)"
    )
    return (
        f"{where}, namespace {settings.namespace!r} when auth is off, command timeout "
        f"{settings.redis_timeout_s:g}s; {acks}"
    )


def describe_models(engine: SessionEngine) -> str:
    """`char_lstm (version(s) 1, default 1); other (version(s) 1, 2, default 2)`."""
    return "; ".join(
        f"{name} (version(s) {', '.join(engine.versions(name))}, "
        f"default {engine.default_version(name)})"
        for name in engine.models()
    )


def log_start(settings: Settings, store: StateStore, *, described: bool) -> None:
    """The first lines of the start log: who, which settings, which store."""
    logger.info(
        "rnnserve %s (Python %s, pid %d)",
        rnnserve_version(),
        platform.python_version(),
        os.getpid(),
    )
    changed = settings.changed()
    logger.info(
        "settings not at their defaults: %s",
        ", ".join(f"{name}={value}" for name, value in changed.items()) if changed else "none",
    )
    logger.info(
        "state store: %s",
        describe_store(settings) if described else f"{type(store).__name__} (given)",
    )


def _reflection_pool(files: Sequence[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """One pool holding every served file (the KServe files live in a private pool)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dependency in fd.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pool.Add(proto)
        added.add(fd.name)

    for fd in files:
        add(fd)
    return pool


class StartupError(Exception):
    """The server cannot start, said in one line for the operator: `rnnserve serve` prints
    it as `error: ...` and exits 1, without a traceback."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = _read(settings.tls_key_file, "TLS key file")
    cert = _read(settings.tls_cert_file, "TLS certificate file")
    client_ca = (
        _read(settings.tls_client_ca_file, "TLS client CA file")
        if settings.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_port_free(host: str, port: int) -> None:
    """StartupError if `host:port` is taken: bound by a socket without SO_REUSEPORT (as
    this probe is), or by one with it (which refuses a probe without it)."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as gRPC sets it: connections of an earlier server in TIME_WAIT do
        # not hold the port, a listening socket still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port}: the port is in use or the address is not "
                f"this machine's ({exc.strerror})"
            ) from exc


class RnnserveServer:
    """One server process: see the module docstring for the lifecycle."""

    def __init__(self, settings: Settings, *, store: StateStore | None = None) -> None:
        self.settings = settings
        self._store_given = store is not None
        self.store = store if store is not None else make_store(settings)
        self.engine = SessionEngine(self.store, namespace=settings.namespace)
        self.repository = ModelRepository(settings.model_repository, self.engine, settings)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._servers: list[aio.Server] = []  # `acceptors` of them, on one port
        self._poller: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._ready = False
        self._started = False  # start() completed: stop() then drains and says so
        self._health_task: asyncio.Task[None] | None = None
        self._interceptor: StatusInterceptor | None = None
        self.metrics: MetricsServer | None = None

    def _servicers(self) -> list[tuple[Callable[[Any, Any], None], Any]]:
        """Every service and its registration function, built once for all acceptors."""
        pool = _reflection_pool(
            [pb.DESCRIPTOR, kserve_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
        )
        return [
            (pb_grpc.add_RecurrentServicer_to_server, RecurrentServicer(self.engine)),
            (
                kserve_grpc.add_GRPCInferenceServiceServicer_to_server,
                InferenceServicer(self.engine, ready=self.is_ready),
            ),
            (health_pb2_grpc.add_HealthServicer_to_server, self.health),
            # The asyncio reflection servicer by name: `enable_server_reflection` picks it
            # only for an `aio.Server`, which the wrapping proxy is not.
            (
                reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                reflection.aio.ReflectionServicer(SERVICES, pool=pool),
            ),
        ]

    def _grpc_server(
        self, servicers: list[tuple[Callable[[Any, Any], None], Any]], *, reuse_port: bool
    ) -> aio.Server:
        """One gRPC server with every service (all acceptors share the servicers, the
        engine and the interceptor)."""
        limit = self.settings.max_message_bytes
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", int(reuse_port)),
            ],
        )
        # Every handler is registered wrapped by the interceptor (built once per method;
        # gRPC's own interceptors rebuild a handler per call).
        assert self._interceptor is not None
        wrapped = self._interceptor.serve_on(server)
        for register, servicer in servicers:
            register(servicer, wrapped)
        return server

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus, *, overall: bool = True
    ) -> None:
        """`overall=False`: the served services only, not "" (the process as a whole, which
        liveness probes read: a Redis outage must make pods unready, not restart them)."""
        for name in (
            ("", NATIVE_SERVICE, KSERVE_SERVICE) if overall else (NATIVE_SERVICE, KSERVE_SERVICE)
        ):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, load and warm the models, then report SERVING. Returns the bound port."""
        settings = self.settings
        log_start(settings, self.store, described=not self._store_given)
        if settings.tracing and not tracing.ENABLED:
            try:
                tracing.enable()
            except tracing.TracingUnavailable as exc:
                raise StartupError(str(exc)) from exc
            logger.info("tracing: on (OpenTelemetry)")
        try:
            auth = TokenAuth.from_settings(settings.auth_tokens_file, settings.auth_tokens)
        except (RnnserveError, OSError) as exc:
            raise StartupError(f"auth tokens: {exc}") from exc
        if settings.metrics_port is not None and self.metrics is None:
            # Up before the models load: a scrape during warm-up sees the process.
            self.metrics = start_metrics_server(
                settings.host,
                settings.metrics_port,
                reuse_port=settings.reuse_port,
                multiprocess_dir=os.environ.get(MULTIPROC_ENV) or None,
            )
            logger.info("metrics on http://%s:%d/metrics", settings.host, self.metrics.port)
        process_started()  # rnnserve_models_loaded at 0 until a model loads
        self._interceptor = StatusInterceptor(auth, settings.namespace, loaded=self.engine.serves)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = _server_credentials(settings)
        sharing = settings.acceptors > 1
        if sharing and not settings.reuse_port and settings.port:
            # The acceptors share the port with SO_REUSEPORT, which would also share it
            # with another process of this user that holds it the same way: refuse a
            # port someone holds, as a single server would.
            _check_port_free(settings.host, settings.port)
        port = settings.port
        servicers = self._servicers()
        for _ in range(settings.acceptors):
            server = self._grpc_server(servicers, reuse_port=settings.reuse_port or sharing)
            address = f"{settings.host}:{port}"
            try:
                bound = (
                    server.add_secure_port(address, credentials)
                    if credentials is not None
                    else server.add_insecure_port(address)
                )
            except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
                await asyncio.gather(*(started.stop(None) for started in self._servers))
                self._servers.clear()
                raise StartupError(
                    f"cannot listen on {address}: the port is in use or the address is not "
                    "this machine's"
                ) from exc
            await server.start()
            self._servers.append(server)
            port = bound  # port 0: the others share the port the first one got
        self.port = int(port)
        logger.info(
            "listening on %s:%d (%s, %d acceptor(s))",
            settings.host,
            port,
            "TLS" if credentials else "plaintext",
            settings.acceptors,
        )
        threads = settings.compute_threads or auto_compute_threads(available_cpus())
        self.repository.compute_threads = threads
        if set_compute_threads(threads):
            logger.info("model steps use up to %d CPU thread(s)", threads)
        else:
            logger.info("compute_threads=%d not applied (runtime already started)", threads)
        try:
            changes = await self.repository.sync()
        except RnnserveError as exc:  # e.g. the repository folder does not exist
            raise StartupError(str(exc)) from exc
        for line in changes:
            logger.info("repository: %s", line)
        if not self.engine.models():
            found = self.repository.scan()
            raise StartupError(
                f"no model loaded from {settings.model_repository}: "
                + (
                    f"all {len(found)} model version(s) failed to load (the log above says why)"
                    if found
                    else "it holds no <name>/<version>/model.keras"
                )
            )
        await self._wait_for_store()
        if settings.repository_poll_s > 0:
            self._poller = asyncio.ensure_future(self.repository.poll(settings.repository_poll_s))
        # The loaded TensorFlow/Keras heap is large and lives as long as the process:
        # move it out of the collector's generations, or each full collection walks it
        # (pauses of ~0.5 s measured: the p99 at 256 sessions, docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        if self._interceptor is not None:
            self._interceptor.start_serving()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        self._started = True
        self._health_task = asyncio.ensure_future(self._watch_health())
        logger.info(
            "serving %d model(s) on %s:%d: %s",
            len(self.engine.models()),
            settings.host,
            self.port,
            describe_models(self.engine),
        )
        return self.port

    async def _store_error(self) -> str | None:
        """Why the state store does not answer now, or None when it does."""
        try:
            async with asyncio.timeout(max(1.0, self.settings.health_check_s)):
                await self.store.ping()
        except (RnnserveError, TimeoutError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def _wait_for_store(self) -> None:
        """At start: a store that is still starting is waited for (NOT_SERVING, a log line)."""
        error = await self._store_error()
        if error is None:
            return
        every = self.settings.health_check_s
        logger.warning(
            "the state store does not answer (%s): NOT_SERVING, retrying every %.1fs", error, every
        )
        while error is not None and self._stopping is None:
            await asyncio.sleep(every)
            error = await self._store_error()
        if self._stopping is not None:
            raise StartupError("stopped while waiting for the state store to answer")
        logger.info("the state store answers")

    async def _watch_health(self) -> None:
        """SERVING only while a model is loaded and the store answers (until a drain)."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.health_check_s)
            error = await self._store_error()
            models = self.engine.models()
            if self._stopping is not None or self._stopped.is_set():
                return
            now = error is None and bool(models)
            if now == serving:
                continue
            serving = self._ready = now
            if now:
                logger.info("SERVING again: %d model(s), the state store answers", len(models))
            else:
                why = "no model is loaded" if not models else f"the state store: {error}"
                logger.warning("NOT_SERVING: %s", why)
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if now
                else health_pb2.HealthCheckResponse.NOT_SERVING,
                overall=False,
            )

    def is_ready(self) -> bool:
        return self._ready and not self._stopped.is_set() and self._stopping is None

    async def wait(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        """Start a graceful stop (signal handlers call this); idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.stop())

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, stop accepting, finish in-flight calls and batches, close the store."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = asyncio.get_running_loop().time() + grace
        self._ready = False
        if self._health_task is not None:
            self._health_task.cancel()
        if self._started:
            logger.info("draining (grace %.1fs)", grace)
        # Refuse new calls (UNAVAILABLE) before a health watcher can see NOT_SERVING.
        if self._interceptor is not None:
            self._interceptor.start_draining()
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
        if self._servers:
            # Calls already running finish first; stopping gRPC with calls still queued in
            # it would answer those CANCELLED instead of UNAVAILABLE.
            if self._interceptor is not None:
                await self._interceptor.wait_idle(grace)
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.gather(*(server.stop(remaining) for server in self._servers))
        await self.engine.aclose()
        if self.metrics is not None:
            self.metrics.close()
        self._stopped.set()
        if self._started:
            logger.info("stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    try:
        server = RnnserveServer(settings)
    except (RnnserveError, ValueError) as exc:  # e.g. a Redis URL that is not one
        raise StartupError(str(exc)) from exc
    server.install_signal_handlers()
    try:
        await server.start()
        print(f"rnnserve listening on port {server.port}", flush=True)
        await server.wait()
    finally:
        await server.stop()
