"""Real servers for tests: a small model repository, an in-process server thread,
and a server subprocess (for signals).

    repo = write_repository(tmp_path)           # tests/models.py: "lstm" and "ctx"
    with ServerThread(Settings(model_repository=repo, port=0)) as server:
        channel = grpc.insecure_channel(server.address)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ServerThread:
    """An `RnnserveServer` on its own event loop in a background thread."""

    def __init__(self, settings: Any, *, start_timeout_s: float = 120.0) -> None:
        self.settings = settings
        self.server: Any = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rnnserve-test-server", daemon=True)
        self._start_timeout_s = start_timeout_s

    def _run(self) -> None:
        from rnnserve.service.server import RnnserveServer

        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = RnnserveServer(self.settings)
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise
            self._ready.set()
            await self.server.wait()

        try:
            self.loop.run_until_complete(main())
        except BaseException:
            pass
        finally:
            self.loop.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise RuntimeError("server failed to start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop (e.g. `server.server.stop()`)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        if self._thread.is_alive() and self.server is not None:
            with contextlib.suppress(RuntimeError):
                self.call(self.server.stop(grace_s))
        self._thread.join(timeout=60)


def spawn_server(
    repo: Path, *extra: str, env: dict[str, str] | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen[str], int]:
    """`rnnserve serve --port 0` in a subprocess; returns it and its port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rnnserve.service.cli",
            "serve",
            "--model-repository",
            str(repo),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        match = re.search(r"rnnserve listening on port (\d+)", line)
        if match:
            reader = threading.Thread(target=_drain, args=(process,), daemon=True)
            reader.start()
            _readers[process.pid] = reader
            return process, int(match.group(1))
    process.kill()
    raise RuntimeError("server subprocess did not start:\n" + "".join(lines[-40:]))


_readers: dict[int, threading.Thread] = {}


@contextlib.contextmanager
def spawned_server(repo: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`spawn_server` (no warm-up unless `env` says) as a context: its address, and the
    process terminated and its output closed afterwards."""
    process, port = spawn_server(repo, *extra, env={"RNNSERVE_WARMUP": "false", **(env or {})})
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)
        close_output(process)


def close_output(process: subprocess.Popen[str]) -> None:
    """After a spawned server exited: wait for its output reader, close the pipe."""
    reader = _readers.pop(process.pid, None)
    if reader is not None:
        reader.join(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def _drain(process: subprocess.Popen[str]) -> None:
    """Read the server's output until it exits (so it never blocks on a full pipe)."""
    assert process.stdout is not None
    with process.stdout:
        for _ in process.stdout:
            pass


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
