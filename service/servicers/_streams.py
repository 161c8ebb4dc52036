"""Bidirectional streams whose messages are answered concurrently.

`serve_submitted` answers requests that each become one future (a step in the batcher):
StepStream and StepManyStream. `answer_concurrently` runs a task per request, for
answers that must wait on more than one thing (KServe's sequence order).

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
from collections import deque
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


async def serve_submitted(
    read: Callable[[], Awaitable[Request | None]],
    write: Callable[[Reply], Awaitable[None]],
    submit: Callable[[Request], Reply | asyncio.Future[Any]],
    finish: Callable[[Request, asyncio.Future[Any]], Reply],
    *,
    window: int,
) -> None:
    """Answer a stream's requests, each by one future, without a task per message.

    `read()` gives the next request (None once the client is done sending);
    `submit(request)` runs on arrival and gives the reply at once (an error) or a
    future (a step in the batcher); `finish(request, future)` turns the settled future
    into the reply and must not raise; `write(reply)` sends it. Replies go out in
    settling order as soon as they are ready; at most `window` futures are pending (the
    reader waits for a free slot, which pushes back on a fast client). Returns once the
    request stream has ended and every reply is written; an error of `read` is raised
    after that. Leaving early (the client went away: `write` raises, or the call is
    cancelled) cancels the futures not yet settled (the batcher drops steps not yet
    batched).

    On gRPC, `read` is `context.read()` and `write` is `context.write()`: no async
    generators between the transport and the batcher, in either direction.
    """
    replies: deque[Reply] = deque()
    ready = asyncio.Event()
    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Future[Any]] = set()
    reading = True

    def settled(request: Request, future: asyncio.Future[Any]) -> None:
        pending.discard(future)
        slots.release()
        replies.append(finish(request, future))
        ready.set()

    async def reader() -> None:
        nonlocal reading
        try:
            while (request := await read()) is not None:
                await slots.acquire()
                out = submit(request)
                if isinstance(out, asyncio.Future):
                    pending.add(out)
                    out.add_done_callback(functools.partial(settled, request))
                else:
                    slots.release()
                    replies.append(out)
                    ready.set()
        finally:
            reading = False
            ready.set()

    task = asyncio.ensure_future(reader())
    try:
        while True:
            while replies:
                await write(replies.popleft())
            if not reading and not pending:
                break
            ready.clear()  # no await since `replies` was seen empty: nothing is missed
            await ready.wait()
        await task  # the request stream's own error, if any
    finally:
        task.cancel()
        for future in list(pending):
            future.cancel()
