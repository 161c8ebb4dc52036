"""DynamicBatcher: batch forming, per-key order and exclusivity, failures, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from rnnserve.service.batcher import RETRY, DynamicBatcher, Request, Retry
from rnnserve.service.errors import QueueFull, ShuttingDown

Batch = list[Request[int, int]]


class Recorder:
    """A handler that records its batches and answers payload * 10."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[tuple[object, int]]] = []
        self.delay = delay
        self.active: set[object] = set()
        self.concurrent = 0
        self.max_concurrent = 0

    async def __call__(self, batch: Batch) -> Sequence[int | BaseException | Retry]:
        keys = [r.key for r in batch]
        assert len(set(keys)) == len(keys), "two requests of one key in a batch"
        assert not self.active & set(keys), "a key in two batches in flight"
        self.active |= set(keys)
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        self.batches.append([(r.key, r.payload) for r in batch])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= set(keys)
            self.concurrent -= 1
        return [r.payload * 10 for r in batch]


async def test_fills_up_to_max_batch_size() -> None:
    handler = Recorder()
    async with DynamicBatcher(handler, max_batch_size=4, max_queue_delay_s=0.05) as batcher:
        results = await asyncio.gather(*(batcher.call(i, i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in handler.batches] == [4, 4, 2]
    assert batcher.stats.size_counts == {4: 2, 2: 1}
    assert batcher.stats.max_batch_size == 4


async def test_waits_for_more_until_the_delay() -> None:
    handler = Recorder()
    async with DynamicBatcher(
        handler, max_batch_size=8, max_queue_delay_s=0.2, idle_dispatch=False
    ) as batcher:
        first = batcher.submit("a", 1)
        await asyncio.sleep(0.01)
        second = batcher.submit("b", 2)
        assert await asyncio.gather(first, second) == [10, 20]
    assert [len(b) for b in handler.batches] == [2]


async def test_idle_dispatch_goes_at_once_and_fills_while_busy() -> None:
    handler = Recorder(delay=0.05)
    async with DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=1.0) as batcher:
        first = batcher.submit("a", 1)
        await asyncio.sleep(0.01)  # "a" runs alone: nothing was running, no waiting
        assert handler.batches == [[("a", 1)]]
        rest = [batcher.submit(k, 2) for k in "bcd"]
        assert await asyncio.gather(first, *rest) == [10, 20, 20, 20]
    # b, c, d waited for each other while "a" computed (bounded by the delay)
    assert [len(b) for b in handler.batches] == [1, 3]


async def test_an_idle_model_waits_for_a_session_seen_recently() -> None:
    # "b" stepped a moment ago and has nothing queued: its next step is on its way (a
    # closed-loop client), so "a" waits for it instead of running alone.
    handler = Recorder()
    async with DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=5.0) as batcher:
        assert await asyncio.gather(batcher.submit("a", 1), batcher.submit("b", 2)) == [10, 20]
        first = batcher.submit("a", 3)
        await asyncio.sleep(0.05)
        assert len(handler.batches) == 1  # "a" is waiting for "b"
        second = batcher.submit("b", 4)
        assert await asyncio.gather(first, second) == [30, 40]
    assert handler.batches == [[("a", 1), ("b", 2)], [("a", 3), ("b", 4)]]


async def test_a_session_that_does_not_come_back_costs_at_most_the_delay() -> None:
    handler = Recorder()
    loop = asyncio.get_running_loop()
    async with DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.2) as batcher:
        await asyncio.gather(batcher.submit("a", 1), batcher.submit("b", 2))
        started = loop.time()
        assert await batcher.call("a", 3) == 30
        waited = loop.time() - started
    assert handler.batches[-1] == [("a", 3)]
    assert waited >= 0.15  # it waited for "b" (the delay), then went alone


async def test_a_lone_session_never_waits() -> None:
    handler = Recorder()
    loop = asyncio.get_running_loop()
    async with DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=5.0) as batcher:
        started = loop.time()
        for i in range(5):
            assert await batcher.call("a", i) == 10 * i
        assert loop.time() - started < 2.5  # one wait for the delay would take 5 s
    assert [len(b) for b in handler.batches] == [1] * 5


async def test_sessions_quiet_for_the_window_are_not_waited_for() -> None:
    handler = Recorder()
    loop = asyncio.get_running_loop()
    async with DynamicBatcher(
        handler, max_batch_size=8, max_queue_delay_s=5.0, recent_window_s=0.1
    ) as batcher:
        await asyncio.gather(batcher.submit("a", 1), batcher.submit("b", 2))
        await asyncio.sleep(0.2)  # "b" has been quiet for longer than the window
        started = loop.time()
        assert await batcher.call("a", 3) == 30
        assert loop.time() - started < 2.5


async def test_one_request_per_key_per_batch_in_order() -> None:
    handler = Recorder(delay=0.001)
    keys = ["a", "a", "b", "a", "c", "b", "a"]
    async with DynamicBatcher(
        handler, max_batch_size=8, max_queue_delay_s=0.01, max_batches_in_flight=3
    ) as batcher:
        results = await asyncio.gather(*(batcher.call(k, i) for i, k in enumerate(keys)))
    assert results == [i * 10 for i in range(len(keys))]
    seen: dict[object, list[int]] = {}
    for batch in handler.batches:
        for key, payload in batch:
            seen.setdefault(key, []).append(payload)
    assert seen == {"a": [0, 1, 3, 6], "b": [2, 5], "c": [4]}
    assert len(handler.batches) == 4  # "a" needs four batches


async def test_batches_in_flight_are_bounded() -> None:
    handler = Recorder(delay=0.02)
    async with DynamicBatcher(
        handler, max_batch_size=2, max_queue_delay_s=0, max_batches_in_flight=2
    ) as batcher:
        await asyncio.gather(*(batcher.call(i, i) for i in range(12)))
    assert handler.max_concurrent == 2


async def test_cancelled_requests_are_dropped() -> None:
    handler = Recorder()
    async with DynamicBatcher(handler, max_batch_size=8, max_queue_delay_s=0.01) as batcher:
        doomed = batcher.submit("a", 1)
        behind = batcher.submit("a", 2)  # waits in a's line, then is cancelled too
        kept = batcher.submit("b", 3)
        doomed.cancel()
        behind.cancel()
        assert await kept == 30
        assert await batcher.call("a", 4) == 40
    assert [p for b in handler.batches for _, p in b] == [3, 4]
    assert batcher.stats.dropped_cancelled == 2


async def test_failed_batch_fails_every_request_with_the_cause() -> None:
    cause = RuntimeError("model exploded")

    async def handler(batch: Batch) -> Sequence[int]:
        raise cause

    async with DynamicBatcher(handler, max_batch_size=4, max_queue_delay_s=0.01) as batcher:
        outcomes = await asyncio.gather(
            *(batcher.call(i, i) for i in range(3)), return_exceptions=True
        )
        assert outcomes == [cause, cause, cause]
        assert batcher.stats.failed_batches == 1


async def test_per_request_exceptions_and_wrong_result_count() -> None:
    async def handler(batch: Batch) -> Sequence[int | BaseException]:
        if len(batch) == 3:
            return [1]
        return [ValueError(r.payload) if r.payload % 2 else r.payload for r in batch]

    async with DynamicBatcher(handler, max_batch_size=2, max_queue_delay_s=0.01) as batcher:
        assert await batcher.call("a", 2) == 2
        with pytest.raises(ValueError, match="3"):
            await batcher.call("a", 3)
    async with DynamicBatcher(handler, max_batch_size=3, max_queue_delay_s=0.05) as batcher:
        outcomes = await asyncio.gather(
            *(batcher.call(i, i) for i in range(3)), return_exceptions=True
        )
        assert all("1 result(s) for a batch of 3" in str(o) for o in outcomes)


async def test_retry_goes_first_and_keeps_the_key_busy() -> None:
    calls: list[list[tuple[object, int, int]]] = []

    async def handler(batch: Batch) -> Sequence[int | Retry]:
        calls.append([(r.key, r.payload, r.attempts) for r in batch])
        return [RETRY if r.payload == 1 and r.attempts < 2 else r.payload for r in batch]

    async with DynamicBatcher(handler, max_batch_size=4, max_queue_delay_s=0.01) as batcher:
        results = await asyncio.gather(batcher.call("a", 1), batcher.call("a", 2))
    assert results == [1, 2]
    assert [c for batch in calls for c in batch if c[0] == "a"] == [
        ("a", 1, 0),
        ("a", 1, 1),
        ("a", 1, 2),
        ("a", 2, 0),
    ]
    assert batcher.stats.retried == 2


async def test_queue_is_bounded() -> None:
    handler = Recorder(delay=0.01)
    async with DynamicBatcher(
        handler, max_batch_size=2, max_queue_delay_s=0.01, max_queue_size=3
    ) as batcher:
        futures = [batcher.submit(i, i) for i in range(3)]
        with pytest.raises(QueueFull, match="3 requests queued") as info:
            batcher.submit(99, 99)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert await asyncio.gather(*futures) == [0, 10, 20]


async def test_aclose_drains_then_refuses() -> None:
    handler = Recorder(delay=0.005)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        handler, max_batch_size=4, max_queue_delay_s=1.0
    )
    futures = [batcher.submit(i % 3, i) for i in range(20)]
    await batcher.aclose()
    assert [f.result() for f in futures] == [i * 10 for i in range(20)]
    with pytest.raises(ShuttingDown):
        batcher.submit(1, 1)
    await batcher.aclose()  # idempotent


async def test_aclose_without_drain_fails_what_is_queued() -> None:
    handler = Recorder(delay=0.05)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        handler, max_batch_size=1, max_queue_delay_s=0
    )
    futures = [batcher.submit("k", i) for i in range(5)]
    await asyncio.sleep(0.01)  # the first one is in flight
    await batcher.aclose(drain=False)
    assert futures[0].result() == 0
    for future in futures[1:]:
        assert isinstance(future.exception(), ShuttingDown)


async def test_on_batch_hook_sees_sizes() -> None:
    sizes: list[int] = []
    handler = Recorder()
    async with DynamicBatcher(
        handler,
        max_batch_size=3,
        max_queue_delay_s=0.01,
        on_batch=lambda size, seconds: sizes.append(size),
    ) as batcher:
        await asyncio.gather(*(batcher.call(i, i) for i in range(7)))
    assert sizes == [3, 3, 1]


def test_bad_limits_are_refused() -> None:
    async def handler(batch: Batch) -> Sequence[int]:
        return []

    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(handler, max_batch_size=0)
    with pytest.raises(ValueError, match="max_batches_in_flight"):
        DynamicBatcher(handler, max_batches_in_flight=0)
