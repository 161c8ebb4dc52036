"""`DynamicBatcher`: many callers' requests become a few batched calls.

Each caller enqueues a small `Request` that carries its own future and awaits it.
One loop task waits for the first request, then fills the batch until it holds
`max_batch_size` requests or `max_queue_delay_s` has passed, and hands it to the
handler in a task of its own; at most `max_batches_in_flight` such tasks run at once
(a semaphore), so the next batch fills while the previous one computes.

With `idle_dispatch` (the default) the batcher does not wait when no batch is
running and no other key is expected: it takes what is queued and goes, so a lone
session gets unbatched latency. A key is expected when it submitted within the last
`recent_window_s` and has nothing queued or in a batch now (its caller is elsewhere:
in gRPC, on the network, computing its next step): then the batch waits for it, up
to the delay. Under load the keys of a closed loop come back while the batch fills,
so batches grow to the sessions that are really there instead of to what one turn of
the event loop delivered; while another batch is running, a batch always waits up to
the delay (it could not run sooner anyway).

Requests carry a `key` (the session). A key has at most one request in flight, in
any batch: a second request for a busy key waits in that key's line and becomes
ready, in order, when the first completes. So a batch never holds two steps of one
session, and a session's steps apply in the order they were submitted.

The handler returns one result per request, in order: a value, an exception (that
request fails) or `RETRY` (the request goes back to the front of the queue, keeping
its key busy, with `attempts` incremented). If the handler raises, every request of
the batch fails with that exception. Requests whose future was cancelled are dropped
before they reach a batch. `aclose()` stops intake and drains what is queued.

The handler is a coroutine: anything CPU-heavy in it (the model step) must run in an
executor so the event loop never blocks; see `rnnserve.service.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from . import tracing
from .errors import Internal, QueueFull, ShuttingDown

__all__ = ["RETRY", "BatcherStats", "DynamicBatcher", "Group", "Request", "Retry"]

logger = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class Retry:
    def __repr__(self) -> str:
        return "RETRY"


RETRY: Final = Retry()
"""A handler's result meaning: run this request again in a later batch."""


class Group:
    """Requests submitted together (`submit_many`) whose caller waits for all of them:
    `done` resolves once the last one is settled, without a callback per request."""

    __slots__ = ("done", "left")

    def __init__(self, done: asyncio.Future[None], count: int) -> None:
        self.done = done
        self.left = count
        if not count:
            done.set_result(None)

    def settle(self) -> None:
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)


@dataclass(eq=False, slots=True)
class Request(Generic[P, R]):
    """One caller's request: what the handler sees. `attempts` counts RETRYs so far."""

    key: Hashable
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float
    attempts: int = 0
    group: Group | None = None
    trace: Any = None  # the caller's span context, with tracing on (`tracing.batch`)


@dataclass
class BatcherStats:
    """What the batcher has done so far (tests read it; metrics will)."""

    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    retried: int = 0
    dropped_cancelled: int = 0
    size_counts: Counter[int] = field(default_factory=Counter)

    @property
    def max_batch_size(self) -> int:
        return max(self.size_counts, default=0)

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


Handler = Callable[[list[Request[P, R]]], Awaitable[Sequence[R | BaseException | Retry]]]
BatchHook = Callable[[int, float], None]


class DynamicBatcher(Generic[P, R]):
    """Batches requests for `handler`; see the module docstring for the rules.

    `on_batch(size, seconds)` is called after each batch (for metrics).
    Use `async with` or `start()` / `aclose()`; `submit` starts it on first use.
    """

    def __init__(
        self,
        handler: Handler[P, R],
        *,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 4096,
        max_batches_in_flight: int = 2,
        idle_dispatch: bool = True,
        recent_window_s: float = 1.0,
        on_batch: BatchHook | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got {max_batches_in_flight}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_size = max_queue_size
        self.max_batches_in_flight = max_batches_in_flight
        self.idle_dispatch = idle_dispatch
        self.recent_window_s = recent_window_s
        self.name = name
        self._on_batch = on_batch
        self.stats = BatcherStats()
        self._ready: deque[Request[P, R]] = deque()
        self._waiting: dict[Hashable, deque[Request[P, R]]] = {}
        self._active: set[Hashable] = set()
        # key -> when it last submitted (perf_counter); pruned to `recent_window_s`
        self._seen: dict[Hashable, float] = {}
        self._pruned_at = 0.0
        self._queued = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._running = 0  # batches whose handler has not returned yet
        self._loop_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closing = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start the batching loop on the running event loop (idempotent)."""
        if self._closing:
            raise ShuttingDown(f"{self.name} is closed")
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._progress = asyncio.Event()
            self._slots = asyncio.Semaphore(self.max_batches_in_flight)
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"{self.name}-loop"
            )

    async def __aenter__(self) -> DynamicBatcher[P, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop taking requests; run (drain=True) or fail (`ShuttingDown`) what is queued,
        wait for batches in flight, then stop the loop. Idempotent."""
        self._closing = True
        if self._loop_task is None or self._closed:
            self._closed = True
            return
        assert self._wakeup is not None and self._progress is not None
        if not drain:
            self._fail_queued(ShuttingDown(f"{self.name} closed before this request ran"))
        self._wakeup.set()
        while (self._queued or self._in_flight) and not self._loop_task.done():
            if self._in_flight:
                await asyncio.wait(list(self._in_flight))
            else:  # queued requests wait for the loop to dispatch them
                self._progress.clear()
                await self._progress.wait()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._fail_queued(ShuttingDown(f"{self.name} closed before this request ran"))
        self._closed = True

    # -- intake ----------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests waiting (ready or behind their key's request in flight)."""
        return self._queued

    @property
    def active_keys(self) -> int:
        """Keys (sessions) with a request queued or in a batch."""
        return len(self._active)

    @property
    def in_flight(self) -> int:
        """Batches running now."""
        return len(self._in_flight)

    def submit(self, key: Hashable, payload: P) -> asyncio.Future[R]:
        """Queue one request; its future resolves with the handler's result for it.

        Raises `QueueFull` at `max_queue_size` and `ShuttingDown` once closing.
        """
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down and takes no new requests")
        if self._queued >= self.max_queue_size:
            raise QueueFull(
                f"{self.name}: {self._queued} requests queued (max_queue_size "
                f"{self.max_queue_size}); retry later"
            )
        self.start()
        loop = asyncio.get_running_loop()
        request: Request[P, R] = Request(key, payload, loop.create_future(), time.perf_counter())
        if tracing.ENABLED:
            request.trace = tracing.current_span_context()
        self._queued += 1
        self._enqueue(request)
        return request.future

    def submit_many(
        self, items: Sequence[tuple[Hashable, P]]
    ) -> tuple[list[asyncio.Future[R]], Group]:
        """Queue many requests at once, in order (all or none: `QueueFull` if they do
        not all fit): one future each, as `submit` gives, and their `Group`, whose
        `done` resolves when every one is settled. Cancelling `done` does not cancel
        the requests; cancel their futures."""
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down and takes no new requests")
        if self._queued + len(items) > self.max_queue_size:
            raise QueueFull(
                f"{self.name}: {self._queued} requests queued and {len(items)} more offered "
                f"(max_queue_size {self.max_queue_size}); retry later"
            )
        self.start()
        create_future = asyncio.get_running_loop().create_future
        group = Group(create_future(), len(items))
        now = time.perf_counter()
        trace = tracing.current_span_context() if tracing.ENABLED else None
        futures: list[asyncio.Future[R]] = []
        for key, payload in items:
            request: Request[P, R] = Request(key, payload, create_future(), now, 0, group, trace)
            futures.append(request.future)
            self._enqueue(request)
        self._queued += len(items)
        return futures, group

    def _enqueue(self, request: Request[P, R]) -> None:
        """Behind its key's request in flight, or ready (and the loop woken)."""
        key = request.key
        self._seen[key] = request.enqueued_at
        if key in self._active:
            line = self._waiting.get(key)
            if line is None:
                line = self._waiting[key] = deque()
            line.append(request)
        else:
            self._active.add(key)
            self._ready.append(request)
            assert self._wakeup is not None
            self._wakeup.set()

    async def call(self, key: Hashable, payload: P) -> R:
        """Submit and wait. Cancelling the caller drops the request if not yet batched."""
        return await self.submit(key, payload)

    # -- internals ---------------------------------------------------------------------
    def _release(self, key: Hashable) -> None:
        """`key`'s request finished: make its next live request ready, or free the key."""
        line = self._waiting.get(key)
        while line:
            nxt = line.popleft()
            if nxt.future.done():  # cancelled while it waited
                self._queued -= 1
                self.stats.dropped_cancelled += 1
                if nxt.group is not None:
                    nxt.group.settle()
                continue
            self._ready.append(nxt)
            if not line:
                del self._waiting[key]
            assert self._wakeup is not None
            self._wakeup.set()
            return
        self._waiting.pop(key, None)
        self._active.discard(key)

    def _others_expected(self) -> bool:
        """Whether a key that submitted recently has nothing here now (so its next
        request may be on its way): the idle model then waits for it, up to the delay."""
        now = time.perf_counter()
        if now - self._pruned_at > self.recent_window_s / 4:
            horizon = now - self.recent_window_s
            active = self._active  # kept: so every active key is counted in `_seen`
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon or k in active}
            self._pruned_at = now
        return len(self._seen) > len(self._active)

    def _pop_ready(self) -> Request[P, R] | None:
        while self._ready:
            request = self._ready.popleft()
            self._queued -= 1
            if request.future.done():
                self.stats.dropped_cancelled += 1
                if request.group is not None:
                    request.group.settle()
                self._release(request.key)
                self._signal_progress()
                continue
            return request
        return None

    def _signal_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()

    def _fail_queued(self, exc: BaseException) -> None:
        pending = list(self._ready)
        for line in self._waiting.values():
            pending.extend(line)
        self._ready.clear()
        self._waiting.clear()
        self._active.clear()
        self._queued = 0
        for request in pending:
            if not request.future.done():
                request.future.set_exception(exc)
            if request.group is not None:
                request.group.settle()
        self._signal_progress()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._slots.acquire()
                try:
                    batch = await self._fill(loop)
                except BaseException:
                    self._slots.release()
                    raise
                self._running += 1
                task = loop.create_task(self._run_batch(batch), name=f"{self.name}-batch")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                self._signal_progress()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave callers hanging
            logger.exception("%s loop failed", self.name)
            self._closing = True
            self._fail_queued(Internal(f"{self.name} failed: {exc!r}"))
            raise

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> list[Request[P, R]]:
        wakeup = self._wakeup
        assert wakeup is not None
        first = self._pop_ready()
        while first is None:
            wakeup.clear()
            await wakeup.wait()
            first = self._pop_ready()
        batch = [first]
        deadline = loop.time() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            request = self._pop_ready()
            if request is not None:
                batch.append(request)
                continue
            if self._closing or (
                self.idle_dispatch and not self._running and not self._others_expected()
            ):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await wakeup.wait()
            except TimeoutError:
                break  # nothing arrived for a gap (or the delay is over): go
        return batch

    async def _run_batch(self, batch: list[Request[P, R]]) -> None:
        assert self._slots is not None
        started = time.perf_counter()
        results: Sequence[R | BaseException | Retry]
        try:
            with tracing.batch(self.name, batch):
                results = await self._handler(batch)
            if len(results) != len(batch):
                raise Internal(
                    f"{self.name} handler returned {len(results)} result(s) for a batch of "
                    f"{len(batch)}"
                )
        except asyncio.CancelledError:
            self.stats.failed_batches += 1
            results = [ShuttingDown(f"{self.name}: batch cancelled")] * len(batch)
        except Exception as exc:
            self.stats.failed_batches += 1
            results = [exc] * len(batch)
        finally:
            self._slots.release()
            self._running -= 1
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.size_counts[len(batch)] += 1
        # Resolve every future before freeing keys: a key's next request becomes
        # ready only after its predecessor's outcome is visible.
        retried: list[Request[P, R]] = []
        released: list[Hashable] = []
        for request, result in zip(batch, results, strict=True):
            if result is RETRY and not request.future.done():
                request.attempts += 1
                retried.append(request)
                continue
            released.append(request.key)
            if not request.future.done():
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                elif result is not RETRY:
                    request.future.set_result(result)  # type: ignore[arg-type]
            if request.group is not None:
                request.group.settle()
        if retried:
            self.stats.retried += len(retried)
            self._ready.extendleft(reversed(retried))
            self._queued += len(retried)
            assert self._wakeup is not None
            self._wakeup.set()
        for key in released:
            self._release(key)
        if self.idle_dispatch and not self._running:
            # the model is idle: a batch still filling should go now
            assert self._wakeup is not None
            self._wakeup.set()
        self._signal_progress()
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), elapsed)
            except Exception:
                logger.exception("%s on_batch hook failed", self.name)
