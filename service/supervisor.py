"""`rnnserve serve --processes N` with N > 1: N server processes on one port, one /metrics.

    supervisor = Supervisor(settings, processes=4)
    exit_code = supervisor.run()     # until SIGTERM/SIGINT, then every process drains

The supervisor starts N ordinary single-process servers (`rnnserve serve
--processes 1`), all binding the same port with SO_REUSEPORT so the kernel spreads
connections over them, and serves `/metrics` itself from a private prometheus-client
multiprocess folder the children write to. Sessions move freely between the
processes because their state is in Redis; the memory store lives in one process, so
N > 1 needs `redis_url` (`process_count` refuses it otherwise).

Why subprocesses that run `rnnserve serve` again, not `multiprocessing`: each child is
exactly the single-process server (its signal handlers, its drain, its compute
children), started from a fresh interpreter. Nothing of the supervisor (its metrics
thread, its signal handlers, its imports) is inherited as with fork, and nothing is
pickled as with spawn; the supervisor never imports TensorFlow, so it stays a small
process. The resolved settings travel as `RNNSERVE_*` variables, so every child agrees
with the supervisor (a port picked here, the metrics folder, the thread share).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from rnnserve.service.metrics import MULTIPROC_ENV, MetricsServer, start_metrics_server
from rnnserve.service.multiproc import SUPERVISOR_PREFIX
from rnnserve.service.settings import Settings, auto_compute_threads, available_cpus

__all__ = [
    "RESTART_LIMIT",
    "RESTART_WINDOW_S",
    "SUPERVISOR_ENV",
    "Supervisor",
    "child_environment",
    "exit_with_supervisor",
    "pick_free_port",
    "process_count",
]

logger = logging.getLogger(__name__)

# A child that dies unexpectedly is started again, at most this many times (all
# children together) in any RESTART_WINDOW_S; one more death stops everything.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
# After SIGTERM: how long past the children's own grace period before SIGKILL.
STOP_MARGIN_S = 15.0
POLL_S = 0.1
# Set in a child's environment: the supervisor's pid (the child dies with it).
SUPERVISOR_ENV = "_RNNSERVE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


class ProcessesError(ValueError):
    """`processes` cannot be honoured with these settings."""


def process_count(settings: Settings) -> int:
    """How many server processes to run: `processes`, or the usable CPUs for 0 (auto).

    Raises `ProcessesError` for N > 1 with the memory store (it lives in one process,
    so a second process would not see the first one's sessions); auto falls back to 1.
    """
    if settings.processes == 0:
        cpus = available_cpus()
        if settings.redis_url is None:
            logger.info(
                "processes=0 (auto): 1 process, not %d: the memory store lives in one process",
                cpus,
            )
            return 1
        logger.info("processes=0 (auto): %d process(es), one per usable CPU", cpus)
        return cpus
    if settings.processes > 1 and settings.redis_url is None:
        raise ProcessesError(
            f"--processes {settings.processes} needs a shared state store (--redis-url): "
            "the memory store lives in one process"
        )
    return settings.processes


def pick_free_port(host: str) -> int:
    """A port free on `host` now (bound and released; the children bind it next)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_environment(
    settings: Settings, base: Mapping[str, str], *, multiprocess_dir: str | None
) -> dict[str, str]:
    """`base` with every setting replaced by `settings`' value (`RNNSERVE_<FIELD>`; a
    None field is left unset) and the metrics folder replaced by `multiprocess_dir`."""
    ours = {f"rnnserve_{name}" for name in Settings.model_fields}
    ours |= {MULTIPROC_ENV.lower(), SUPERVISOR_ENV.lower()}
    env = {key: value for key, value in base.items() if key.lower() not in ours}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"RNNSERVE_{name.upper()}"] = _env_value(value)
    if multiprocess_dir is not None:
        env[MULTIPROC_ENV] = multiprocess_dir
    return env


def exit_with_supervisor() -> None:
    """In a child (its environment names the supervisor): get SIGTERM when the
    supervisor dies, even by SIGKILL, so no orphan keeps serving on the port."""
    supervisor = os.environ.pop(SUPERVISOR_ENV, None)
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(supervisor):  # it died before prctl: nobody would tell us
        raise SystemExit(1)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    exit_code: int | None = None  # set once reaped

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts, restarts and stops the server processes; see the module docstring."""

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 2:
            raise ValueError("the supervisor runs two or more processes")
        self.settings = settings
        self.processes = processes
        self.port = 0
        self.metrics: MetricsServer | None = None
        self._children: list[_Child] = []
        self._restarts: deque[float] = deque()
        self._signals: list[int] = []
        self._env: dict[str, str] = {}
        self._command = [sys.executable, "-m", "rnnserve.service.cli", "serve", "--processes", "1"]

    def _child_settings(self) -> Settings:
        settings = self.settings
        threads = settings.compute_threads
        if threads == 0:  # one less than this process's share of the CPUs
            threads = auto_compute_threads(available_cpus(), self.processes)
        return settings.model_copy(
            update={
                "port": self.port,
                "reuse_port": True,
                "processes": 1,
                "metrics_port": None,  # the supervisor serves /metrics for all
                "compute_threads": threads,
            }
        )

    def _spawn(self) -> _Child:
        # Output inherited. A process group of its own: signals reach a child only
        # through the supervisor, once each (a terminal's Ctrl-C or a `kill` of our
        # group would also reach it directly, and a second SIGTERM landing after its
        # drain, once its handlers are gone, would kill it on its way out).
        return _Child(subprocess.Popen(self._command, env=self._env, process_group=0))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (forwarded to every child), then wait for them.

        Returns 0 when every process exited 0 after the stop; non-zero when one had
        to be killed, did not exit 0, or children died too often to keep restarting.
        """
        settings = self.settings
        self.port = settings.port or pick_free_port(settings.host)
        folder: str | None = None
        if settings.metrics_port is not None:
            # Fresh and private: a stale folder's counters of dead processes would be
            # summed into ours. Under PROMETHEUS_MULTIPROC_DIR when one is given.
            parent = os.environ.get(MULTIPROC_ENV)
            folder = tempfile.mkdtemp(
                prefix=SUPERVISOR_PREFIX,  # multiproc.py removes dead ones
                dir=parent if parent and os.path.isdir(parent) else None,
            )
            self.metrics = start_metrics_server(
                settings.host,
                settings.metrics_port,
                reuse_port=settings.reuse_port,
                multiprocess_dir=folder,
            )
            logger.info(
                "metrics of all processes on http://%s:%d/metrics",
                settings.host,
                self.metrics.port,
            )
        self._env = child_environment(self._child_settings(), os.environ, multiprocess_dir=folder)
        self._env[SUPERVISOR_ENV] = str(os.getpid())
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._children = [self._spawn() for _ in range(self.processes)]
            logger.info(
                "serving with %d processes on port %d (pids %s)",
                self.processes,
                self.port,
                ", ".join(str(child.pid) for child in self._children),
            )
            return self._supervise(folder)
        finally:
            for child in self._children:  # only after an error of our own
                if child.process.poll() is None:
                    child.process.kill()
                    child.process.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.metrics is not None:
                self.metrics.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def _supervise(self, folder: str | None) -> int:
        stopping = False
        failed = False
        forwarded = 0
        deadline = 0.0
        while True:
            if len(self._signals) > forwarded:  # forward each signal as it comes
                signum = self._signals[-1]
                forwarded = len(self._signals)
                if not stopping:
                    logger.info(
                        "%s: stopping %d processes", signal.Signals(signum).name, self.processes
                    )
                    stopping = True
                    deadline = time.monotonic() + self.settings.grace_period_s + STOP_MARGIN_S
                self._send(signum)
            for i, child in enumerate(self._children):
                if child.exit_code is not None:
                    continue
                code = child.process.poll()
                if code is None:
                    continue
                child.exit_code = code
                if folder is not None:  # its live gauges leave the sum
                    mark_process_dead(child.pid, folder)  # type: ignore[no-untyped-call]
                if stopping:
                    if code != 0:
                        logger.warning("server process %d: %s", child.pid, _describe(code))
                    continue
                if self._may_restart():
                    logger.warning(
                        "server process %d exited unexpectedly (%s): starting another",
                        child.pid,
                        _describe(code),
                    )
                    self._children[i] = self._spawn()
                    logger.info(
                        "started server process %d in its place (pids %s)",
                        self._children[i].pid,
                        ", ".join(str(c.pid) for c in self._children),
                    )
                else:
                    logger.error(
                        "server process %d exited unexpectedly (%s), after %d restarts in "
                        "%.0f s: stopping all",
                        child.pid,
                        _describe(code),
                        RESTART_LIMIT,
                        RESTART_WINDOW_S,
                    )
                    failed = stopping = True
                    deadline = time.monotonic() + self.settings.grace_period_s + STOP_MARGIN_S
                    self._send(signal.SIGTERM)
            if stopping:
                if all(child.exit_code is not None for child in self._children):
                    break
                if time.monotonic() > deadline:
                    for child in self._children:
                        if child.exit_code is None:
                            logger.error("server process %d did not stop: SIGKILL", child.pid)
                            child.process.kill()
                            child.process.wait()
                    failed = True
                    break
            time.sleep(POLL_S)
        codes = [child.exit_code for child in self._children]
        logger.info("all processes exited (%s)", ", ".join(str(code) for code in codes))
        return 1 if failed or any(code != 0 for code in codes) else 0

    def _send(self, signum: int) -> None:
        for child in self._children:
            if child.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= RESTART_LIMIT:
            return False
        self._restarts.append(now)
        return True
