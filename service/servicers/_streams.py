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
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

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


async def answer_submitted(
    requests: AsyncIterator[Request],
    submit: Callable[[Request], Reply | asyncio.Future[Any]],
    finish: Callable[[Request, asyncio.Future[Any]], Reply],
    *,
    window: int,
) -> AsyncIterator[Reply]:
    """`answer_concurrently` for requests answered by one future each, without a task
    per message: `submit(request)` runs on arrival and gives the reply at once (an
    error) or a future (a step in the batcher); `finish(request, future)` turns the
    settled future into the reply and must not raise. Closing the stream cancels the
    futures not yet settled (the batcher drops steps not yet batched)."""
    replies: asyncio.Queue[Reply | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Future[Any]] = set()
    reading = True

    def settled(request: Request, future: asyncio.Future[Any]) -> None:
        pending.discard(future)
        slots.release()
        replies.put_nowait(finish(request, future))
        if not reading and not pending:
            replies.put_nowait(None)

    async def read() -> None:
        nonlocal reading
        try:
            async for request in requests:
                await slots.acquire()
                out = submit(request)
                if isinstance(out, asyncio.Future):
                    pending.add(out)
                    out.add_done_callback(functools.partial(settled, request))
                else:
                    slots.release()
                    replies.put_nowait(out)
        finally:
            reading = False
            if not pending:
                replies.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
        await reader  # the request stream's own error, if any
    finally:
        reader.cancel()
        for future in list(pending):
            future.cancel()
