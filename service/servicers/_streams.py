"""Bidirectional streams whose messages are answered concurrently.

A stream may carry the steps of many sessions: answering them one after the
other would put one step per batch. Each message gets its own task instead
(at most `window` at once, which pushes back on a fast client), and replies
are yielded as they complete. Tasks are created in arrival order and reach
the engine's batcher before their first await, so the steps of one session
keep their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


async def answer_concurrently(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Reply]],
    *,
    window: int,
) -> AsyncIterator[Reply]:
    """Yield `await answer(request)` for each request, in completion order.

    `answer` is called when its request arrives (so anything it computes
    before its first await happens in arrival order) and must turn its own
    errors into replies: one bad message must not end the stream.
    """
    replies: asyncio.Queue[Reply | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)

    async def run(pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
        finally:
            slots.release()
        await replies.put(reply)

    async def read() -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.ensure_future(run(answer(request)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            await replies.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
        await reader
    finally:
        reader.cancel()
