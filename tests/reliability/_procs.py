"""Processes the reliability tests start and kill: rnnserve replicas (subprocesses) and
their memory and file counts. The private redis-servers, the Redis Cluster and the
Sentinel group are tests/redis_servers.py's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.servers import spawn_server


class Replica:
    """`rnnserve serve` in a subprocess (so it can be SIGKILLed); its output is drained."""

    def __init__(self, repo: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.process, self.port = spawn_server(
            repo, *flags, env={"RNNSERVE_WARMUP": "false", **(env or {})}
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
