"""The servers a benchmark run measures, each started as subprocesses and stopped after its points.

- `echo`: `loadtests.harness.echo` (the transport ceiling; every mode);
- `echo-a2`: `echo` with two gRPC servers on its port, as rnnserve's default `--acceptors 2`;
- `echo-hold`: `echo` whose `ModelInfer` waits for a tick every 5 ms that answers all
  waiting calls at once (as a batch does), so as many calls are in flight as in rnnserve;
- `echo-suspend`: `echo` whose unary `Step` awaits a future settled on the next loop
  iteration before it answers (what gRPC charges for a handler that suspends);
- `unbatched`: rnnserve, memory store, `--max-batch-size 1`;
- `memory`: rnnserve, memory store (defaults: batches up to 256, 2 ms queue delay);
- `memory-proc`: `memory` with `--compute-process true` (the model step in a child process);
- `redis`: rnnserve, Redis store (a fresh namespace per run);
- `redis-xN`: `--processes N`: N rnnserve processes on one port (SO_REUSEPORT) under one
  supervisor with one `/metrics`, one Redis namespace;
- `triton`: tritonserver 2.51 from nvidia-pytriton 0.7.0 (`triton_peer/setup.sh`), KServe
  modes only, the `lstm256` model only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.harness.load import MODES

ROOT = Path(__file__).resolve().parents[2]
TRITON_MODES = ("kserve", "kserve-stream")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Peer:
    name: str
    commands: list[list[str]]
    ready_pattern: str
    ready_count: int = 1  # lines matching ready_pattern that mean ready (one per process)
    modes: tuple[str, ...] = MODES
    models: tuple[str, ...] | None = None  # None: every model
    # Most concurrent KServe streams it survives (None: no limit). tritonserver 2.51 from
    # pytriton 0.7.0 dies with SIGSEGV (in TRITONBACKEND_RequestRelease, under the Python
    # backend's execute) when two or more ModelStreamInfer streams carry sequences at once.
    max_streams: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    metrics_port: int | None = None  # rnnserve's Prometheus endpoint (all its processes)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    tails: list[deque[str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serves(self, mode: str, model: str) -> bool:
        return mode in self.modes and (self.models is None or model in self.models)

    def start(self, timeout_s: float = 300.0) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **self.env}
        for command in self.commands:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            self.processes.append(process)
            tail: deque[str] = deque(maxlen=40)
            self.tails.append(tail)
            seen = threading.Event()
            threading.Thread(
                target=_pump,
                args=(process, tail, self.ready_pattern, self.ready_count, seen),
                daemon=True,
            ).start()
            deadline = time.monotonic() + timeout_s
            while not seen.wait(0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"peer {self.name} did not start:\n" + "".join(tail))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def log_tail(self) -> str:
        return "".join(line for tail in self.tails for line in tail)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def scrape(self) -> dict[str, float]:
        """Sums of rnnserve's batch histograms (empty when there is no endpoint)."""
        if self.metrics_port is None:
            return {}
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
            ) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(
                r"(rnnserve_(?:batch_size_steps|compute_duration_seconds|"
                r"state_load_duration_seconds|state_commit_duration_seconds)_(?:sum|count))"
                r"\{[^}]*\} ([0-9.e+-]+)$",
                line,
            )
            if match:
                totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
        return totals

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def _pump(
    process: subprocess.Popen[str],
    tail: deque[str],
    pattern: str,
    count: int,
    seen: threading.Event,
) -> None:
    assert process.stdout is not None
    matched = 0
    with process.stdout:
        for line in process.stdout:
            tail.append(line)
            if not seen.is_set() and re.search(pattern, line):
                matched += 1
                if matched >= count:
                    seen.set()


def rnnserve(
    name: str,
    repository: Path,
    *extra: str,
    processes: int = 1,
) -> Peer:
    port = free_port()
    base = [
        sys.executable,
        "-m",
        "rnnserve.service.cli",
        "serve",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        *extra,
    ]
    # processes > 1: one supervisor, N servers on the port, one /metrics for all of them.
    metrics_port = free_port()
    base += ["--metrics-port", str(metrics_port), "--processes", str(processes)]
    return Peer(
        name=name,
        commands=[base],
        ready_pattern=r"rnnserve listening on port",
        ready_count=processes,
        port=port,
        metrics_port=metrics_port,
    )


def build_peers(
    names: list[str],
    repository: Path,
    redis_url: str,
    triton_venv: Path,
    rnnserve_args: tuple[str, ...] = (),
) -> list[Peer]:
    peers = []
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    for name in names:
        if name in ("echo", "echo-suspend", "echo-a2", "echo-hold"):
            port = free_port()
            flags = {
                "echo-suspend": ["--suspend"],
                "echo-a2": ["--acceptors", "2"],
                "echo-hold": ["--hold-ms", "5"],
            }.get(name, [])
            peers.append(
                Peer(
                    name=name,
                    commands=[
                        [
                            sys.executable,
                            "-m",
                            "loadtests.harness.echo",
                            "--port",
                            str(port),
                            *flags,
                        ]
                    ],
                    ready_pattern=r"echo listening on port",
                    port=port,
                )
            )
        elif name == "unbatched":
            peers.append(rnnserve(name, repository, *rnnserve_args, "--max-batch-size", "1"))
        elif name == "memory":
            peers.append(rnnserve(name, repository, *rnnserve_args))
        elif name == "memory-proc":
            peers.append(rnnserve(name, repository, *rnnserve_args, "--compute-process", "true"))
        elif name == "redis" or name.startswith("redis-x"):
            count = 1 if name == "redis" else int(name.removeprefix("redis-x"))
            peers.append(
                rnnserve(
                    name,
                    repository,
                    *rnnserve_args,
                    "--redis-url",
                    redis_url,
                    "--namespace",
                    namespace,
                    processes=count,
                )
            )
        elif name == "triton":
            peers.append(triton(triton_venv))
        else:
            raise ValueError(f"unknown peer {name!r}")
    return peers


def triton(venv: Path) -> Peer:
    env_file = venv / "env.sh"
    if not env_file.exists():
        raise RuntimeError(f"no Triton peer at {venv}: run loadtests/triton_peer/setup.sh first")
    env: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        match = re.match(r'export (\w+)="(.*)"$', line)
        if match:
            env[match.group(1)] = match.group(2).replace(
                "${LD_LIBRARY_PATH:-}", os.environ.get("LD_LIBRARY_PATH", "")
            )
    port = free_port()
    return Peer(
        name="triton",
        commands=[
            [
                env["TRITON_BIN"],
                "--model-repository",
                env["TRITON_REPOSITORY"],
                "--backend-directory",
                env["TRITON_BACKENDS"],
                "--grpc-port",
                str(port),
                "--allow-http",
                "false",
                "--allow-metrics",
                "false",
                "--model-control-mode",
                "none",
                "--exit-on-error",
                "true",
            ]
        ],
        ready_pattern=r"Started GRPCInferenceService",
        modes=TRITON_MODES,
        models=("lstm256",),
        max_streams=1,
        env={"LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"]},
        port=port,
    )
