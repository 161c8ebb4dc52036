"""`serve_submitted`: one future per streamed request, replies written as they settle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from rnnserve.service.servicers._streams import serve_submitted


async def _requests(items: list[int], gate: asyncio.Event | None = None) -> AsyncIterator[int]:
    for item in items:
        yield item
    if gate is not None:
        await gate.wait()  # the client keeps the stream open


def _reader(requests: AsyncIterator[int]) -> Callable[[], Any]:
    """`read()` over an async iterator: the next request, None at its end."""
    iterator = aiter(requests)

    async def read() -> int | None:
        return await anext(iterator, None)

    return read


async def _writes(replies: list[str]) -> Callable[[str], Any]:
    async def write(reply: str) -> None:
        replies.append(reply)
        await asyncio.sleep(0)  # a write may suspend

    return write


async def _until(condition: Callable[[], bool], ticks: int = 1000) -> None:
    """Let the event loop run until `condition()` holds (bounded: fails, not hangs)."""
    for _ in range(ticks):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def _finish(request: int, future: asyncio.Future[int]) -> str:
    if future.cancelled():
        return f"{request}:cancelled"
    if future.exception() is not None:
        return f"{request}:error {future.exception()}"
    return f"{request}:{future.result()}"


async def test_every_request_answered_in_settling_order() -> None:
    loop = asyncio.get_running_loop()
    futures: dict[int, asyncio.Future[int]] = {}

    def submit(request: int) -> str | asyncio.Future[int]:
        if request % 3 == 0:
            return f"{request}:refused"  # answered at once, like a bad step
        futures[request] = loop.create_future()
        return futures[request]

    replies: list[str] = []

    async def settle() -> None:
        await _until(lambda: len(futures) == 6)  # 1, 2, 4, 5, 7, 8
        for request in sorted(futures, reverse=True):  # settle last-submitted first
            if request == 5:
                futures[request].set_exception(ValueError("bad"))
            else:
                futures[request].set_result(request * 10)

    settler = asyncio.ensure_future(settle())
    write = await _writes(replies)
    await serve_submitted(_reader(_requests(list(range(9)))), write, submit, _finish, window=16)
    await settler
    assert replies[:3] == ["0:refused", "3:refused", "6:refused"]
    assert replies[3:] == ["8:80", "7:70", "5:error bad", "4:40", "2:20", "1:10"]


async def test_window_bounds_pending_and_close_cancels_them() -> None:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[int]] = []

    def submit(request: int) -> asyncio.Future[int]:
        pending.append(loop.create_future())
        return pending[-1]

    gate = asyncio.Event()
    replies: list[str] = []
    write = await _writes(replies)
    served = asyncio.ensure_future(
        serve_submitted(_reader(_requests(list(range(10)), gate)), write, submit, _finish, window=4)
    )
    await _until(lambda: len(pending) == 4)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(pending) == 4  # the reader waits for a free slot
    pending[0].set_result(1)
    await _until(lambda: replies == ["0:1"])
    await _until(lambda: len(pending) == 5)  # the freed slot lets one more request in
    served.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await served
    assert all(f.cancelled() for f in pending[1:])
    gate.set()


async def test_a_failed_write_cancels_the_pending() -> None:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[int]] = []

    def submit(request: int) -> asyncio.Future[int]:
        pending.append(loop.create_future())
        return pending[-1]

    async def write(reply: str) -> None:
        raise ConnectionResetError("the client is gone")

    gate = asyncio.Event()
    served = asyncio.ensure_future(
        serve_submitted(_reader(_requests([1, 2, 3], gate)), write, submit, _finish, window=4)
    )
    await _until(lambda: len(pending) == 3)
    pending[1].set_result(2)
    with pytest.raises(ConnectionResetError):
        await served
    assert pending[0].cancelled() and pending[2].cancelled()
    gate.set()


async def test_an_error_of_the_request_stream_ends_the_replies() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ValueError("not a valid message")

    loop = asyncio.get_running_loop()

    def submit(request: int) -> asyncio.Future[int]:
        future = loop.create_future()
        future.set_result(request)
        return future

    replies: list[str] = []
    write = await _writes(replies)
    with pytest.raises(ValueError, match="not a valid message"):
        await serve_submitted(_reader(broken()), write, submit, _finish, window=4)
    assert replies == ["1:1"]
