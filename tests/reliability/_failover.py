"""What the failover tests share: a counting model, the load of many sessions, and the
count of what was acknowledged, lost and duplicated.

The model `count` adds its input to its one state and outputs the new state: every
step sends 1, so a session at seq s holds s, and the reply of the step that made
seq s outputs s. A step applied twice, or applied on an older state than its seq
says, shows as a state or an output that differs from the seq.

Each session steps with `seq` and a request id per seq, as the SDK does: on
UNAVAILABLE it retries the same step (a replay if it had landed); on
`SessionRolledBack` (read from the status's `ErrorDetail`, as the SDK reads it) the
store lost steps it had acknowledged: they are counted as lost and the session goes
on from the stored seq. At the end every session's record is read back: a stored
seq behind the last acknowledged one lost steps after the session's last step; its
next step must then name the gap, else the loss went unnoticed (there must be none).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import keras
import numpy as np
from grpc import aio

from rnnserve.client._exceptions import SeqConflict, SessionRolledBack, from_rpc_error
from rnnserve.core import RecurrentModel
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.wire import decode_tensor, encode_tensor

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")


def write_counter_repository(root: Path) -> Path:
    """`root/count/1`: state c, input x (1 float each); c' = c + x, output c'."""
    x = keras.Input((1,), name="x")
    c = keras.Input((1,), name="c")
    total = keras.layers.Add(name="add")([x, c])
    out = keras.layers.Identity(name="total")(total)
    rnn = RecurrentModel(
        sequence_inputs=x,
        state_inputs=c,
        sequence_outputs=out,
        state_outputs=total,
        return_sequences=True,
        name="count_rnn",
    )
    xs = keras.Input((None, 1), name="xs")
    folder = root / "count" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    keras.Model(xs, rnn(xs), name="count_model").save(folder / "model.keras")
    (folder / "config.yaml").write_text("max_batch_size: 64\nmax_queue_delay_ms: 2\n")
    return root


@dataclass
class Figures:
    """What one load saw; `lost` counts acknowledged steps the store no longer has."""

    sessions: int
    steps: int
    acknowledged: int = 0
    lost: int = 0
    rolled_back: int = 0  # SessionRolledBack answers (each names `missing` lost steps)
    duplicated: int = 0  # replies or records whose count differs from their seq
    unavailable: int = 0  # UNAVAILABLE / DEADLINE_EXCEEDED answers (retried)
    resynced: int = 0  # steps skipped: the session was ahead of this client (see `drive`)
    errors_by_session: list[int] = field(default_factory=list)
    unnoticed: int = 0  # lost steps that no answer named (not even the next step's)
    lost_after_end: int = 0  # of `lost`: after the session's last step, named by the next
    stepped: int = 0  # the seqs the sessions ended at, summed: `steps` each, or more
    first_error_at: float | None = None  # time.monotonic() of the first error answer
    last_error_at: float | None = None

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.sessions} sessions x {self.steps}+ steps ({self.stepped} in all): "
            f"{self.acknowledged} acknowledged, {self.lost} lost ({self.rolled_back} "
            f"SessionRolledBack answers during the load, {self.lost_after_end} steps named by "
            f"the next step after it, {self.unnoticed} unnoticed), {self.duplicated} duplicated, "
            f"{self.unavailable} UNAVAILABLE answers retried, {self.resynced} steps skipped on resynchronising"
        )


def _stub(address: str) -> tuple[aio.Channel, pb_grpc.RecurrentStub]:
    channel = aio.insecure_channel(address)
    return channel, pb_grpc.RecurrentStub(channel)


async def start_sessions(address: str, ids: list[str]) -> None:
    channel, stub = _stub(address)
    async with channel:
        for session in ids:
            await stub.StartSession(
                pb.StartSessionRequest(model="count", session_id=session), timeout=30
            )


async def drive(
    address: str,
    ids: list[str],
    steps: int,
    *,
    fault: Callable[[], Awaitable[None]],
    fault_after: int,
    timeout_s: float = 120.0,
    step_timeout_s: float = 3.0,
) -> Figures:
    """Step every session `steps` times; once `fault_after` steps in all are
    acknowledged, run `fault` (concurrently with the load) and go on until every
    session is at `steps` and the fault is over (or `timeout_s` passes: an
    AssertionError). `Figures.stepped` is where the sessions ended, in all."""
    figures = Figures(len(ids), steps, errors_by_session=[0] * len(ids))
    acked_seq = [0] * len(ids)
    one = encode_tensor("x", np.ones(1, np.float32))
    fault_started = asyncio.Event()
    fault_task: asyncio.Task[None] | None = None
    channel, stub = _stub(address)

    def error_now() -> None:
        now = time.monotonic()
        figures.first_error_at = figures.first_error_at if figures.first_error_at else now
        figures.last_error_at = now

    async def session(k: int) -> None:
        nonlocal fault_task
        sid = ids[k]
        seq = 0
        # At least `steps` steps, and on until a step succeeds after the fault is over:
        # on a fast machine the load would otherwise end before the fault begins, or
        # on an UNAVAILABLE answer without one step on the new master.
        while True:
            request = pb.StepRequest(
                model="count", session_id=sid, seq=seq, request_id=f"{sid}#{seq}", inputs=[one]
            )
            try:
                reply = await stub.Step(request, timeout=step_timeout_s)
            except aio.AioRpcError as exc:
                figures.errors_by_session[k] += 1
                error_now()
                if exc.code() in RETRYABLE:
                    figures.unavailable += 1
                    await asyncio.sleep(0.05)
                    continue
                # Read as the SDK reads it: the status's ErrorDetail, not its text.
                error = from_rpc_error(exc)
                if isinstance(error, SessionRolledBack):
                    stored, expected = error.stored_seq, error.requested_seq
                    assert expected == seq, exc.details()
                    assert _names_gap(exc, stored, expected), exc.details()
                    figures.rolled_back += 1
                    figures.lost += expected - stored
                    seq = acked_seq[k] = stored  # counted: not a loss at the end
                    continue
                if isinstance(error, SeqConflict) and error.current_seq is not None:
                    # After a rollback, a step this session sent before it (its call
                    # given up on, still queued on the server) can apply again: the
                    # session is ahead of this client. Go on from there.
                    current = error.current_seq
                    assert current > seq, exc.details()
                    figures.resynced += current - seq
                    seq = current
                    continue
                raise
            if int(decode_tensor(reply.outputs[0])[0]) != reply.seq or reply.seq != seq + 1:
                figures.duplicated += 1
            seq = int(reply.seq)
            figures.acknowledged += 1  # (again, for a step acknowledged before a loss)
            acked_seq[k] = max(acked_seq[k], seq)
            if not fault_started.is_set() and figures.acknowledged >= fault_after:
                fault_started.set()
                fault_task = asyncio.ensure_future(fault())
            if seq >= steps and fault_task is not None and fault_task.done():
                return

    async with channel:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(session(k) for k in range(len(ids)))), timeout_s
            )
        finally:
            if fault_task is not None:
                await fault_task
        assert fault_started.is_set(), "the load ended before the fault"
        for k, sid in enumerate(ids):
            ref = pb.SessionRef(model="count", session_id=sid)
            record = await _until_available(functools.partial(stub.ExportState, ref, timeout=10))
            info = await _until_available(functools.partial(stub.GetSession, ref, timeout=10))
            state = [decode_tensor(t) for t in record.states]
            if int(state[0][0]) != info.seq:
                figures.duplicated += 1
            figures.stepped += max(info.seq, acked_seq[k])
            if info.seq < acked_seq[k]:
                # Lost after this session's last step (it had finished before the
                # fault took its last commits): its client finds out on its next step,
                # which sends the seq it holds. That step must name the gap.
                figures.lost += acked_seq[k] - info.seq
                figures.lost_after_end += acked_seq[k] - info.seq
                if not await _names_the_gap(stub, sid, acked_seq[k], info.seq, one):
                    figures.unnoticed += acked_seq[k] - info.seq
    return figures


async def _until_available(call: Callable[[], Awaitable[T]], within_s: float = 30.0) -> T:
    """`call()`, retried while the store is still settling after the fault (UNAVAILABLE:
    e.g. a Sentinel still reports the failover under way)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def _names_the_gap(
    stub: pb_grpc.RecurrentStub, sid: str, held: int, stored: int, one: pb.Tensor
) -> bool:
    """Whether the next step of a client that holds seq `held` is refused with the
    rolled-back answer naming the stored seq (and so is not applied on older state)."""
    request = pb.StepRequest(
        model="count", session_id=sid, seq=held, request_id=f"{sid}#{held}", inputs=[one]
    )
    try:
        await _until_available(lambda: stub.Step(request, timeout=10))
    except aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        return (
            isinstance(error, SessionRolledBack)
            and (error.stored_seq, error.requested_seq) == (stored, held)
            and _names_gap(exc, stored, held)
        )
    return False


def _names_gap(exc: aio.AioRpcError, stored: int, expected: int) -> bool:
    """Whether the message tells a person the gap too (docs/protocol.md's wording)."""
    return f"is at seq {stored} but this step expected seq {expected}" in (exc.details() or "")
