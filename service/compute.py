"""`ComputeProcess`: a model's step in a process of its own, fed through shared memory.

The event loop and the model step share one GIL when the step runs in a thread: each
call needs the GIL to hand its arrays to the runtime and again to take the results,
and waits for it (up to the interpreter's switch interval, 5 ms) whenever the loop is
busy, which under load is always. In a process of its own the step holds its own GIL.

    worker = ComputeProcess(path, signature, max_batch_size=256, slots=2)
    await worker.start()                 # spawns, loads and warms the model there
    outputs, new_states = await worker.run(inputs, constants, states)
    await worker.aclose()

Per call the parent copies the batch's arrays into one of `slots` regions of a shared
memory block, sends 8 bytes down a pipe, and awaits the reply without a thread (the
pipe is watched by the event loop); the child steps the arrays in place and writes the
outputs and new states into the same region. A child that dies fails the calls it had
and is started again on the next call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Internal, Unavailable

if TYPE_CHECKING:  # the child imports TensorFlow only once its stderr is filtered
    from rnnserve.core import StepSignature, TensorSpec

__all__ = ["ComputeProcess"]

logger = logging.getLogger(__name__)

_CALL = struct.Struct("<II")  # slot, rows
_DONE = struct.Struct("<Id")  # slot, compute seconds (a message follows on error)
_ALIGN = 64
START_TIMEOUT_S = 600.0


def _layout(
    groups: Sequence[Sequence[TensorSpec]], rows: int
) -> tuple[list[list[tuple[int, tuple[int, ...], np.dtype[Any]]]], int]:
    """Byte offsets of every tensor of every group for `rows` rows, and the total size."""
    offset = 0
    out = []
    for specs in groups:
        group = []
        for spec in specs:
            dtype = np.dtype(spec.numpy_dtype)
            group.append((offset, tuple(spec.shape), dtype))
            nbytes = rows * math.prod(spec.shape) * dtype.itemsize
            offset += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        out.append(group)
    return out, offset


def _groups(signature: StepSignature) -> list[Sequence[TensorSpec]]:
    # inputs, constants, states (in), outputs, states (out)
    return [
        signature.inputs,
        signature.constants,
        signature.states,
        signature.outputs,
        signature.states,
    ]


def _views(
    buf: Any, base: int, group: list[tuple[int, tuple[int, ...], np.dtype[Any]]], n: int
) -> list[np.ndarray]:
    return [
        np.ndarray((n, *shape), dtype=dtype, buffer=buf, offset=base + offset)
        for offset, shape, dtype in group
    ]


def _step_slot(step: Any, buf: Any, base: int, groups: list[Any], n: int) -> None:
    """In the child: the step on the arrays of one slot, its results written in place.
    The views over the shared block end with this call (the block cannot close while
    one lives)."""
    inputs, constants, states, outputs, new_states = (
        _views(buf, base, group, n) for group in groups
    )
    got_outputs, got_states = step(inputs, constants, states)
    for target, value in zip((*outputs, *new_states), (*got_outputs, *got_states), strict=True):
        target[...] = value


def _child_main(
    conn: Connection,
    shm_name: str,
    path: str,
    max_batch_size: int,
    warmup: bool,
    threads: int,
    quiet: bool = True,
) -> None:
    """The compute process: load the model, then step batches until the socket closes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rnnserve.service.logs import quiet_native_imports

    with quiet_native_imports(quiet):  # TensorFlow's native INFO lines, as in `serve`
        from rnnserve.core import set_compute_threads

        set_compute_threads(max(1, threads))
        from rnnserve.service.repository import load_step_function

    shm = SharedMemory(name=shm_name)
    # The parent owns the block (and unlinks it); attaching must not register it with
    # the resource tracker a second time (a "leaked shared_memory" warning at exit).
    from multiprocessing import resource_tracker

    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        step = load_step_function(Path(path), max_batch_size, warmup=warmup)
        groups, size = _layout(_groups(step.signature), max_batch_size)
        conn.send_bytes(b"ready")
        while True:
            try:
                slot, n = _CALL.unpack(conn.recv_bytes())
            except EOFError:
                return
            started = time.perf_counter()
            try:
                _step_slot(step, shm.buf, slot * size, groups, n)
                conn.send_bytes(_DONE.pack(slot, time.perf_counter() - started))
            except Exception as exc:  # the parent fails this batch and goes on
                message = f"{type(exc).__name__}: {exc}".encode()[:4000]
                conn.send_bytes(_DONE.pack(slot, -1.0) + message)
    finally:
        shm.close()


def _popen(config: dict[str, Any], fd: int) -> subprocess.Popen[bytes]:
    # Returns once the child is exec'd: nothing here waits for it.
    return subprocess.Popen(
        [sys.executable, "-m", "rnnserve.service.compute", json.dumps(config)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
    )


class ComputeProcess:
    """One model version's step in a child process (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        signature: StepSignature,
        *,
        max_batch_size: int,
        slots: int = 2,
        warmup: bool = True,
        threads: int = 1,
        name: str = "model",
    ) -> None:
        self.path = path
        self.max_batch_size = max_batch_size
        self.slots = max(1, slots)
        self.warmup = warmup
        self.threads = threads
        self.name = name
        self._groups, self._slot_size = _layout(_groups(signature), max_batch_size)
        self._shm: SharedMemory | None = None
        self._process: Any = None
        self._conn: Connection | None = None
        self._free: asyncio.Queue[int] | None = None
        self._pending: dict[int, asyncio.Future[float]] = {}
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    async def start(self) -> None:
        """Spawn the child and wait until its model is loaded (and warmed)."""
        if self._conn is not None:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._spawn())
        await asyncio.shield(self._starting)

    async def _spawn(self) -> None:
        if self._closed:
            raise Unavailable(f"{self.name}: compute process is closed")
        if self._process is not None:  # the one that died: reap it
            old, self._process = self._process, None
            old.kill()
            await asyncio.get_running_loop().run_in_executor(None, old.wait)
        if self._shm is None:
            self._shm = SharedMemory(create=True, size=max(1, self._slot_size * self.slots))
            self._free = asyncio.Queue()
            for slot in range(self.slots):
                self._free.put_nowait(slot)
        # A fresh interpreter (`python -m rnnserve.service.compute`), not multiprocessing's
        # spawn: that re-imports the parent's __main__, which an embedding app may not guard.
        ours, theirs = socket.socketpair()
        config = {
            "fd": theirs.fileno(),
            "shm": self._shm.name,
            "path": str(self.path),
            "max_batch_size": self.max_batch_size,
            "warmup": self.warmup,
            "threads": self.threads,
            # As the parent logs: its native INFO lines only at DEBUG.
            "quiet": not logging.getLogger("rnnserve").isEnabledFor(logging.DEBUG),
        }
        process = _popen(config, theirs.fileno())
        theirs.close()
        parent = Connection(ours.detach())
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(
                loop.run_in_executor(None, self._wait_ready, parent), START_TIMEOUT_S
            )
        except BaseException:
            process.kill()
            parent.close()
            raise
        if not ready:
            code = process.wait()
            parent.close()
            raise Internal(
                f"{self.name}: compute process exited while loading the model (exit code {code})"
            )
        self._process = process
        self._conn = parent
        loop.add_reader(parent.fileno(), self._on_reply)
        logger.info("%s: compute process %d ready", self.name, process.pid)

    @staticmethod
    def _wait_ready(conn: Connection) -> bool:
        try:
            return conn.recv_bytes() == b"ready"
        except EOFError:
            return False

    def _on_reply(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                reply = conn.recv_bytes()
                slot, seconds = _DONE.unpack_from(reply)
                future = self._pending.pop(slot, None)
                if future is None or future.done():
                    continue
                if seconds < 0:
                    message = reply[_DONE.size :].decode(errors="replace")
                    future.set_exception(Internal(f"{self.name}: model step failed: {message}"))
                else:
                    future.set_result(seconds)
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The child died: fail what it had; the next call starts a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()
        code = None if self._process is None else self._process.poll()
        logger.error("%s: compute process died (exit code %s); restarting", self.name, code)
        self.restarts += 1
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    Unavailable(f"{self.name}: the compute process died during this step")
                )

    async def run(
        self, inputs: list[np.ndarray], constants: list[np.ndarray], states: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray], float]:
        """The step on `n` rows: (outputs, new states, seconds the child computed)."""
        n = len(inputs[0]) if inputs else len(states[0])
        if n > self.max_batch_size:
            raise Internal(f"{self.name}: batch of {n} over max_batch_size {self.max_batch_size}")
        if self._conn is None:
            await self.start()
        assert self._free is not None and self._shm is not None
        slot = await self._free.get()
        try:
            conn = self._conn
            if conn is None:
                raise Unavailable(f"{self.name}: the compute process is restarting")
            buf = self._shm.buf
            base = slot * self._slot_size
            groups = self._groups
            for group, arrays in zip(groups[:3], (inputs, constants, states), strict=True):
                for view, array in zip(_views(buf, base, group, n), arrays, strict=True):
                    view[...] = array
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._pending[slot] = future
            try:
                conn.send_bytes(_CALL.pack(slot, n))
            except OSError as exc:
                self._pending.pop(slot, None)
                raise Unavailable(f"{self.name}: compute process unreachable: {exc}") from exc
            seconds = await future
            outputs = [v.copy() for v in _views(buf, base, groups[3], n)]
            new_states = [v.copy() for v in _views(buf, base, groups[4], n)]
            return outputs, new_states, seconds
        finally:
            self._free.put_nowait(slot)

    async def aclose(self) -> None:
        """Stop the child (it finishes nothing new) and free the shared memory."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()  # the child sees EOF and exits
        if self._process is not None:
            process = self._process
            try:
                await asyncio.get_running_loop().run_in_executor(None, process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def main() -> None:
    """`python -m rnnserve.service.compute CONFIG_JSON` (started by `ComputeProcess`)."""
    config = json.loads(sys.argv[1])
    _child_main(
        Connection(config["fd"]),
        config["shm"],
        config["path"],
        config["max_batch_size"],
        config["warmup"],
        config["threads"],
        config.get("quiet", True),
    )


if __name__ == "__main__":
    main()
