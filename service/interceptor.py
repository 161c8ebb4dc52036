"""The one server interceptor, shared by both services (native and KServe).

`StatusInterceptor` wraps every handler (both services): an `RnnserveError` aborts the
call with its code and message (notes included) and its `rnnserve.v1.ErrorDetail`
(reason, seqs) as the binary trailing metadata `rnnserve-error-bin`; anything else is
logged with its traceback and answered INTERNAL with a generic message (the mapping
is `grpc_status.py`). It also authenticates
the caller (`auth.TokenAuth`) and sets the per-call context (`namespace`,
`request_id`, `call_context.py`) that servicers and logs read, and counts every call in the call
metrics, by method, model (the one its first request names, bounded to the loaded
ones: `model_label`) and status code.

It is not a gRPC interceptor: those rebuild the handler they return on every call.
Services are registered through `serve_on(server)`, which wraps each method's handler
once; per call the wrapper only reads the metadata, checks, sets the context and counts
(docs/benchmarks.md: as an interceptor its per-call Python cost 20-77 µs in place).

It also carries the first phase of a drain: after `start_draining()` every new
call (health excepted) is answered UNAVAILABLE by us, and `wait_idle()` waits for
the calls already running. Only then does the server stop gRPC itself: calls that
gRPC still holds unmatched when it stops are CANCELLED, which tells a client
nothing about whether to retry elsewhere.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import operator
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from rnnserve.service import tracing
from rnnserve.service.auth import TokenAuth
from rnnserve.service.call_context import namespace_var, new_request_id, request_id_var
from rnnserve.service.errors import (
    InvalidArgument,
    RnnserveError,
    ShuttingDown,
    Unavailable,
)
from rnnserve.service.grpc_status import ERROR_DETAIL_KEY, describe, error_detail
from rnnserve.service.metrics import UNKNOWN_MODEL, request_metrics

__all__ = ["StatusInterceptor", "model_label", "model_named", "stream_reader"]

logger = logging.getLogger(__name__)

# Probes must work without a token.
UNAUTHENTICATED_SERVICES = ("/grpc.health.v1.Health/",)
# Answered while the models load (probes, reflection, Triton's liveness/readiness);
# everything else is UNAVAILABLE until then, which clients retry.
STARTUP_METHODS = (
    *UNAUTHENTICATED_SERVICES,
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
)


# KServe's model requests name the model in `name`; its infer requests in `model_name`.
_NAME_IS_MODEL = frozenset(
    f"inference.Model{kind}Request" for kind in ("Ready", "Metadata", "Config")
)
_model_getters: dict[type, Callable[[Any], str]] = {}


def _model_getter(cls: type) -> Callable[[Any], str]:
    descriptor = getattr(cls, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None) or {}
    for name in ("model", "model_name"):
        if name in fields and fields[name].type == fields[name].TYPE_STRING:
            return operator.attrgetter(name)
    if "name" in fields and getattr(descriptor, "full_name", "") in _NAME_IS_MODEL:
        return operator.attrgetter("name")
    session = getattr(fields.get("session"), "message_type", None)
    if session is not None and "model" in session.fields_by_name:  # SessionRef: Reset...
        return operator.attrgetter("session.model")
    return lambda message: ""


def model_named(message: Any) -> str:
    """The model a request message names, "" if it names none (health, ListModels)."""
    cls = type(message)
    getter = _model_getters.get(cls)
    if getter is None:
        getter = _model_getters[cls] = _model_getter(cls)
    return getter(message)


def model_label(name: str, loaded: Callable[[str], bool] | None) -> str:
    """The call metrics' `model`: a loaded model's name, else `UNKNOWN_MODEL` (any name
    a client sends must not become a series); "" for a call that names none."""
    if not name:
        return ""
    return name if loaded is not None and loaded(name) else UNKNOWN_MODEL


class StatusInterceptor:
    """Authenticates, sets the call context, and maps errors to status codes.

    `loaded(name)`: whether a model of that name is loaded now (the call metrics'
    `model` label keeps only those)."""

    def __init__(
        self,
        auth: TokenAuth | None,
        default_namespace: str,
        *,
        loaded: Callable[[str], bool] | None = None,
    ) -> None:
        self._auth = auth
        self._default_namespace = default_namespace
        self._loaded = loaded
        self._serving = False
        self._draining = False
        self._calls = _CallCounter()

    def start_serving(self) -> None:
        """The models are loaded: accept every call (until `start_draining`)."""
        self._serving = True

    def start_draining(self) -> None:
        """From now on refuse new calls (health excepted) with UNAVAILABLE."""
        self._draining = True

    async def wait_idle(self, timeout_s: float, *, quiet_s: float = 0.1) -> bool:
        """Wait until no call (health excepted) is running and none has started for
        `quiet_s` (calls gRPC holds but has not handed over yet then arrive, and are
        refused); False if `timeout_s` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._calls.idle.wait(), remaining)
            except TimeoutError:
                return False
            quiet = loop.time() - self._calls.last_started
            if quiet >= quiet_s:
                return True
            await asyncio.sleep(min(quiet_s - quiet, max(0.0, deadline - loop.time())))
        return False

    def serve_on(self, server: aio.Server) -> _Wrapping:
        """What to register services on instead of `server` (`add_XServicer_to_server(
        servicer, interceptor.serve_on(server))`): every handler is served wrapped."""
        return _Wrapping(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` as served: built once per method (not per call, as a gRPC
        interceptor's would be); per call it authenticates, sets the call context, counts
        the call and maps errors."""
        return _wrap(handler, self, method)

    def _begin(
        self, probe: bool, at_startup: bool, metadata: Any
    ) -> tuple[str, str, RnnserveError | None]:
        """A call's namespace, request id and the failure that refuses it (or None)."""
        namespace: str | None = self._default_namespace
        failure: RnnserveError | None = None
        if self._draining and not probe:
            failure = ShuttingDown("the server is draining (shutting down); retry elsewhere")
        elif not self._serving and not at_startup:
            failure = Unavailable("the server is starting (loading models); retry shortly")
        elif self._auth is not None and not probe:
            try:
                namespace = self._auth.namespace_for(metadata)
            except RnnserveError as exc:
                failure, namespace = exc, None
        return namespace or "", new_request_id(metadata), failure


class _Wrapping:
    """A server proxy for the generated `add_XServicer_to_server` functions (and health's
    and reflection's): both the generic and the registered handlers (which gRPC prefers)
    are registered wrapped, each method's once."""

    def __init__(self, server: aio.Server, interceptor: StatusInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._interceptor.wrap(method, handler)
        return wrapped

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(h, self._wrap) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:  # anything else is the server's
        return getattr(self._server, name)


class _Generic(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        return None if handler is None else self._wrap(details.method, handler)


class _CallCounter:
    """Calls running now; `idle` is set while there are none."""

    def __init__(self) -> None:
        self.running = 0
        self.last_started = float("-inf")  # event loop time
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.running += 1
        self.last_started = asyncio.get_running_loop().time()
        self.idle.clear()

    def exit(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.idle.set()


class _Undecodable:
    """What a request that is not a valid message of its method decodes to."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """gRPC answers a request it cannot deserialize UNKNOWN (INTERNAL inside a stream,
    with a logged traceback); the bytes are the client's fault: INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            return _Undecodable(exc)

    return deserialize


class _Call:
    """One call's accounting: when it started, the model its first request names (the
    metrics' label), whether it was counted, its span."""

    __slots__ = ("counted", "model", "span", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.counted = False
        self.model: str | None = None
        self.span: tracing.CallSpan | None = None

    def named(self, request: Any) -> None:
        if self.model is None and not isinstance(request, _Undecodable):
            self.model = model_named(request)


_call_var: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "rnnserve_call", default=None
)


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {request.error}")
    return request


def stream_reader(context: aio.ServicerContext) -> Callable[[], Awaitable[Any]]:
    """`read()` for a stream handler that reads with `context.read()` instead of its
    request iterator: the next request (checked as the iterator's are), None at the end."""
    eof = aio.EOF
    call = _call_var.get()

    async def read() -> Any:
        request = await context.read()
        if request is eof:
            return None
        if call is not None:
            call.named(request)
        return _checked(request)

    return read


async def _checked_stream(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.named(request)
        yield _checked(request)


def _wrap(
    handler: grpc.RpcMethodHandler, gate: StatusInterceptor, method: str
) -> grpc.RpcMethodHandler:
    """`handler` served under `gate` (see `StatusInterceptor.wrap`): built once per method."""
    probe = method.startswith(UNAUTHENTICATED_SERVICES)
    at_startup = method.startswith(STARTUP_METHODS)
    calls = None if probe else gate._calls
    metrics = request_metrics(method)
    loaded = gate._loaded
    deserialize = _tolerant(handler.request_deserializer)

    def enter(context: aio.ServicerContext) -> tuple[_Call, RnnserveError | None]:
        metadata = context.invocation_metadata()
        namespace, request_id, failure = gate._begin(probe, at_startup, metadata)
        namespace_var.set(namespace)
        request_id_var.set(request_id)
        call = _Call()
        _call_var.set(call)
        if calls is not None:
            calls.enter()
        if tracing.ENABLED and not probe:
            call.span = tracing.start_call(method, metadata, request_id)
            call.started = time.perf_counter()
        return call, failure

    def count(call: _Call, code: str) -> None:
        if call.counted:
            return
        call.counted = True
        seconds = time.perf_counter() - call.started
        metrics.finished(model_label(call.model or "", loaded), code, seconds)
        logger.debug("%s %s %.1fms", metrics.method, code, seconds * 1000)
        if call.span is not None:
            call.span.finished(code)

    def leave(call: _Call, context: aio.ServicerContext) -> None:
        if calls is not None:
            calls.exit()
        count(call, "CANCELLED" if context.cancelled() else "OK")
        if call.span is not None:
            call.span.end()

    async def abort(call: _Call, context: aio.ServicerContext, exc: BaseException) -> None:
        code, message = describe(exc)
        count(call, code.name)
        detail = error_detail(exc).SerializeToString()
        await context.abort(code, message, trailing_metadata=((ERROR_DETAIL_KEY, detail),))

    if handler.unary_unary or handler.stream_unary:
        behavior = handler.unary_unary or handler.stream_unary
        streaming = handler.stream_unary is not None

        async def unary_response(request: Any, context: aio.ServicerContext) -> Any:
            call, failure = enter(context)
            try:
                if failure is not None:
                    await abort(call, context, failure)
                if streaming:
                    return await behavior(_checked_stream(request, call), context)
                call.named(request)
                return await behavior(_checked(request), context)
            except Exception as exc:
                if isinstance(exc, aio.AbortError):
                    raise
                await abort(call, context, exc)
            finally:
                leave(call, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary_response,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )

    behavior = handler.unary_stream or handler.stream_stream
    request_streaming = handler.stream_stream is not None

    def checked(request: Any, call: _Call) -> Any:
        if request_streaming:
            return _checked_stream(request, call)
        call.named(request)
        return _checked(request)

    async def stream_response(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        call, failure = enter(context)
        try:
            if failure is not None:
                await abort(call, context, failure)
            async for item in behavior(checked(request, call), context):
                yield item
        except Exception as exc:
            if isinstance(exc, aio.AbortError):
                raise
            await abort(call, context, exc)
        finally:
            leave(call, context)

    async def stream_written(request: Any, context: aio.ServicerContext) -> None:
        # A handler that sends with `context.write()` and returns None (health's Watch)
        # is a coroutine, not an async generator; gRPC tells them apart by type.
        call, failure = enter(context)
        try:
            if failure is not None:
                await abort(call, context, failure)
            await behavior(checked(request, call), context)
        except Exception as exc:
            if isinstance(exc, aio.AbortError):
                raise
            await abort(call, context, exc)
        finally:
            leave(call, context)

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        stream_response if inspect.isasyncgenfunction(behavior) else stream_written,
        request_deserializer=deserialize,
        response_serializer=handler.response_serializer,
    )
