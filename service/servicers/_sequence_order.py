"""The order of one `ModelStreamInfer` stream: the requests of one sequence take effect
in the order they were sent; requests of different sequences run concurrently."""

from __future__ import annotations

import asyncio

from rnnserve.protocol.inference import grpc_service_pb2 as pb
from rnnserve.service.errors import InvalidArgument
from rnnserve.service.servicers._kserve_codec import parameter, session_id_of


class Turn:
    """When one stream request may run, and telling the next request of its sequence
    when it may (see `SequenceOrder`)."""

    def __init__(
        self,
        after: asyncio.Future[None] | None,
        gate: asyncio.Future[None],
        done: asyncio.Future[None],
        *,
        pipelined: bool,
    ) -> None:
        self._after = after
        self._gate = gate
        self._done = done
        self._pipelined = pipelined

    async def wait(self) -> None:
        if self._after is not None and not self._after.done():
            # shield: a cancelled request must not cancel the future another waits on.
            await asyncio.shield(self._after)

    def submitting(self) -> None:
        """Called right before the step goes to the engine: the next plain step of the
        sequence may follow (it runs only once this request suspends, i.e. after the
        step is in the batcher's queue, which keeps the order)."""
        if self._pipelined and not self._gate.done():
            self._gate.set_result(None)

    def finish(self) -> None:
        for future in (self._gate, self._done):
            if not future.done():
                future.set_result(None)


def _all_done(futures: list[asyncio.Future[None]]) -> asyncio.Future[None] | None:
    pending = [f for f in futures if not f.done()]
    if not pending:
        return None
    combined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(pending)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not combined.done():
            combined.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    return combined


class _Chain:
    __slots__ = ("gate", "pending")

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] | None = None  # the last request's gate
        self.pending: list[asyncio.Future[None]] = []  # `done` of unfinished requests


class SequenceOrder:
    """The requests of one sequence in one stream take effect in the order they came.

    Each request waits for the gate of the one before it in its sequence. A plain
    step opens its gate when it hands its step to the engine, so the steps of a
    sequence are pipelined in the batcher's queue. A START or END opens its gate when
    it is complete (the session exists, or is gone), and a START also waits for every
    earlier request of its sequence to complete (it replaces the session they step).
    Requests of different sequences, or without a usable sequence id, do not wait.
    """

    def __init__(self) -> None:
        self._chains: dict[tuple[str, str], _Chain] = {}

    def turn(self, request: pb.ModelInferRequest) -> Turn:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        params = request.parameters
        try:
            key = (request.model_name, session_id_of(params, request.model_name))
        except InvalidArgument:
            return Turn(None, gate, done, pipelined=True)
        start = bool(parameter(params, "sequence_start"))
        end = bool(parameter(params, "sequence_end"))
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = _Chain()
        chain.pending = [f for f in chain.pending if not f.done()]
        after = _all_done(chain.pending) if start else chain.gate
        chain.gate = gate
        chain.pending.append(done)

        def finished(_: asyncio.Future[None]) -> None:
            # Forget the sequence once all its requests so far are done.
            if self._chains.get(key) is chain and all(f.done() for f in chain.pending):
                del self._chains[key]

        done.add_done_callback(finished)
        return Turn(after, gate, done, pipelined=not (start or end))
