"""OpenTelemetry tracing (`--tracing`, the `rnnserve[tracing]` extra), free when off.

With tracing on, every gRPC call is a SERVER span that continues the client's trace
(W3C `traceparent` in the call's metadata, or whatever `OTEL_PROPAGATORS` names).
A step's wait in the batcher is a `rnnserve.queue` span, a child of its call, linked
to the batch that ran it. A batch serves many calls of many traces, so it is a trace
of its own: `rnnserve.batch`, linked to every call it serves, with the children
`state.load`, `compute` and `state.commit`. JSON log lines carry the current
`trace_id`. So a slow step is followed from the client through its queue wait to the
batch and its Redis round trips.

Off (the default), nothing of OpenTelemetry is imported, `ENABLED` is False and every
hook is a shared no-op: `span()` and `batch()` return one `nullcontext`, the
interceptor and the batcher test `ENABLED` and allocate nothing per step.

    tracing.enable()                       # the SDK from the OTEL_* variables
    tracing.enable(provider)               # or a TracerProvider (tests: in-memory)
    with tracing.span("state.load"): ...   # a child of the current span
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

__all__ = [
    "ENABLED",
    "CallSpan",
    "TracingUnavailable",
    "batch",
    "current_span_context",
    "current_trace_id",
    "disable",
    "enable",
    "span",
    "start_call",
]

logger = logging.getLogger(__name__)

ENABLED = False
_tracer: Any = None
_NOOP: Final[AbstractContextManager[None]] = contextlib.nullcontext()
INSTALL_HINT: Final = "pip install 'rnnserve[tracing]'"


class TracingUnavailable(RuntimeError):
    """`--tracing` without OpenTelemetry installed."""


class _Queued(Protocol):
    """What `batch` reads of a batcher's request."""

    enqueued_at: float  # time.perf_counter() at submission
    attempts: int
    trace: Any  # the caller's SpanContext, or None


def _sdk_provider() -> Any:
    """An SDK TracerProvider exporting as the OTEL_* variables say (OTLP by default)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "rnnserve")})
    )
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    exporter: Any = None
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning(
                "tracing: no OTLP exporter installed (pip install opentelemetry-exporter-otlp);"
                " spans are made (trace ids in the logs) but not exported"
            )
        else:
            exporter = OTLPSpanExporter()
    elif exporter_name != "none":
        logger.warning(
            "tracing: OTEL_TRACES_EXPORTER=%s is not one of otlp, console, none: not exported",
            exporter_name,
        )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def enable(provider: Any = None) -> None:
    """Turn tracing on with `provider`; None: the global one, or else an SDK provider
    from the OTEL_* variables (`_sdk_provider`), made global."""
    global ENABLED, _tracer
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise TracingUnavailable(f"tracing needs OpenTelemetry: {INSTALL_HINT}") from exc
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):  # nothing set one up
            try:
                provider = _sdk_provider()
            except ImportError as exc:
                raise TracingUnavailable(
                    f"tracing needs the OpenTelemetry SDK: {INSTALL_HINT}"
                ) from exc
            trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("rnnserve")
    ENABLED = True


def disable() -> None:
    """Back to no-ops (tests)."""
    global ENABLED, _tracer
    ENABLED = False
    _tracer = None


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits); "" when off or outside a span."""
    if not ENABLED:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def current_span_context() -> Any:
    """The current SpanContext (what a queued step keeps of its call), None when off."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def span(name: str) -> AbstractContextManager[Any]:
    """A child of the current span for the block; the shared no-op when off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name)  # type: ignore[no-any-return]


class CallSpan:
    """One gRPC call's SERVER span, current from `start_call` until `end`."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any, token: object) -> None:
        self._span = span
        self._token = token

    def finished(self, code: str) -> None:
        """The call's status code (a gRPC status name): not OK marks the span failed."""
        import grpc
        from opentelemetry.trace import Status, StatusCode

        status = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        self._span.set_attribute("rpc.grpc.status_code", status.value[0])
        if code != "OK":
            self._span.set_status(Status(StatusCode.ERROR, code))

    def end(self) -> None:
        from opentelemetry import context

        with contextlib.suppress(ValueError):  # ended in another context than begun
            context.detach(self._token)  # type: ignore[arg-type]
        self._span.end()


def start_call(method: str, metadata: Any, request_id: str) -> CallSpan:
    """A SERVER span for a call of `method` (`/package.Service/Method`), continuing the
    trace the caller's metadata carries, made current. Only when `ENABLED`."""
    from opentelemetry import context, propagate, trace

    carrier = {
        key: value for key, value in metadata or () if isinstance(value, str)
    }  # binary (-bin) metadata carries no trace context
    parent = propagate.extract(carrier)
    service, _, name = method.lstrip("/").partition("/")
    started = _tracer.start_span(
        method.lstrip("/"),
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "rnnserve.request_id": request_id,
        },
    )
    token = context.attach(trace.set_span_in_context(started, parent))
    return CallSpan(started, token)


def batch(name: str, requests: Sequence[_Queued]) -> AbstractContextManager[Any]:
    """The `rnnserve.batch` span for a batch of `requests` (current for the block), and
    each traced request's `rnnserve.queue` span; the shared no-op when off."""
    if _tracer is None:
        return _NOOP
    return _batch(name, requests)


@contextlib.contextmanager
def _batch(name: str, requests: Sequence[_Queued]) -> Iterator[Any]:
    from opentelemetry import context, trace

    links = [trace.Link(r.trace) for r in requests if r.trace is not None]
    now_ns, now = time.time_ns(), time.perf_counter()
    with _tracer.start_as_current_span(
        "rnnserve.batch",
        context=context.Context(),  # a trace of its own: it serves many
        links=links,
        attributes={"rnnserve.batcher": name, "rnnserve.batch_size": len(requests)},
    ) as batch_span:
        to_batch = [trace.Link(batch_span.get_span_context())]
        for request in requests:
            if request.trace is None:
                continue
            queued = _tracer.start_span(
                "rnnserve.queue",
                context=trace.set_span_in_context(trace.NonRecordingSpan(request.trace)),
                start_time=now_ns - int((now - request.enqueued_at) * 1e9),
                links=to_batch,
                attributes={"rnnserve.batcher": name, "rnnserve.attempt": request.attempts},
            )
            queued.end(end_time=now_ns)
        yield batch_span
