"""`rnnserve serve --processes 2`: a supervisor, two real server processes on one port
(SO_REUSEPORT), one Redis namespace, one `/metrics`.

Which process a connection reached is read from /proc: the accepted socket of each
connection is an open file of exactly one server process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from _grpc_util import FEATURES, delete_namespace, pb, pb_grpc, tensor
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port
from tests.servers import unique

LISTENING = r"rnnserve listening on port"
STEP = "/" + pb.DESCRIPTOR.services_by_name["Recurrent"].full_name + "/Step"
CHANNELS = 16  # a 2**-15 chance that the kernel puts them all on one process


class Supervised:
    """`rnnserve serve --processes 2 ...` in a subprocess; its output (the children's
    too: inherited) is collected line by line."""

    def __init__(self, repo: Path, redis_url: str, *extra: str) -> None:
        self.namespace = unique("procs")
        self.redis_url = redis_url
        self.port = free_port()
        self.metrics_port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "rnnserve.service.cli", "serve",
                "--processes", "2",
                "--redis-url", redis_url,
                "--namespace", self.namespace,
                "--model-repository", str(repo),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--metrics-port", str(self.metrics_port),
                "--warmup", "false",
                "--grace-period-s", "5",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout_s: float = 120) -> re.Match[str]:
        """The `count`-th line matching `pattern` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                matches = [m for line in self.lines if (m := re.search(pattern, line))]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {count} x {pattern!r} in the output:\n" + "".join(self.lines[-60:])
                    )
                self._changed.wait(min(left, 0.5))

    def pids(self) -> list[int]:
        """The server processes now (the supervisor's last line naming them)."""
        found = re.findall(r"\(pids ([\d, ]+)\)", self.output())
        assert found, self.output()
        return [int(pid) for pid in found[-1].split(", ")]

    def ready(self, listening: int = 2) -> Supervised:
        self.wait_for(r"serving with 2 processes on port \d+ \(pids")
        self.wait_for(LISTENING, count=listening)
        return self

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        """After a failure: stop everything. The children get SIGTERM when the supervisor
        dies; any still running after that is killed (checked to be ours by its command)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
            pids = self.pids() if "(pids" in self.output() else []
            deadline = time.monotonic() + 15
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _is_our_server(pid)]
                time.sleep(0.2)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=30)
        delete_namespace(self.redis_url, self.namespace)


def _is_our_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"rnnserve.service.cli\0serve\0--processes\x001" in cmdline.read()
    except OSError:
        return False


def _connections(port: int, pids: list[int]) -> dict[int, set[int]]:
    """Each pid's accepted (server side) established TCP sockets on `port`, by inode."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(int(fields[9]))
    owned: dict[int, set[int]] = {}
    for pid in pids:
        sockets = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                sockets.add(int(target[8:-1]))
        owned[pid] = sockets & inodes
    return owned


def _channel(port: int) -> grpc.Channel:
    # A connection of its own (not the process-wide subchannel pool's shared one).
    return grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


def _channels_by_pid(server: Supervised, count: int = CHANNELS) -> dict[int, list[grpc.Channel]]:
    """`count` new channels, each with one call made, grouped by the process it reached."""
    pids = server.pids()
    by_pid: dict[int, list[grpc.Channel]] = {pid: [] for pid in pids}
    for _ in range(count):
        before = _connections(server.port, pids)
        channel = _channel(server.port)
        pb_grpc.RecurrentStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        after = _connections(server.port, pids)
        owners = [pid for pid in pids if after[pid] - before[pid]]
        assert len(owners) == 1, (before, after)
        by_pid[owners[0]].append(channel)
    return by_pid


def _x(seed: int) -> pb.Tensor:
    return tensor("x", np.random.default_rng(seed).normal(size=FEATURES).astype("float32"))


def _y(reply: pb.StepResponse) -> np.ndarray:
    from rnnserve.service.wire import decode_tensor

    return np.asarray(decode_tensor(reply.outputs[0]))


def _close_all(by_pid: dict[int, list[grpc.Channel]]) -> None:
    for channels in by_pid.values():
        for channel in channels:
            channel.close()


@pytest.fixture(scope="module")
def supervised(model_repo: Path, redis_url: str) -> Iterator[Supervised]:
    server = Supervised(model_repo, redis_url)
    try:
        server.ready()
        yield server
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.output()[-4000:]
    finally:
        server.close()


def test_memory_store_refuses_several_processes(model_repo: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.service.cli", "serve",
            "--processes", "2", "--model-repository", str(model_repo),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "error: --processes 2 needs a shared state store (--redis-url): "
        "the memory store lives in one process"
    ]


def test_two_processes_answer_and_share_sessions(supervised: Supervised) -> None:
    pids = supervised.pids()
    assert len(set(pids)) == 2 and supervised.process.pid not in pids
    by_pid = _channels_by_pid(supervised)
    try:
        assert all(by_pid[pid] for pid in pids), {p: len(c) for p, c in by_pid.items()}
        a, b = (pb_grpc.RecurrentStub(by_pid[pid][0]) for pid in pids)
        # One session started through process A and stepped through A and B in turn;
        # another stepped through A only: the same outputs (the state is in Redis).
        a.StartSession(pb.StartSessionRequest(model="lstm", session_id="shared"))
        a.StartSession(pb.StartSessionRequest(model="lstm", session_id="alone"))
        for t in range(6):
            shared = (b if t % 2 == 0 else a).Step(
                pb.StepRequest(model="lstm", session_id="shared", inputs=[_x(t)]), timeout=30
            )
            alone = a.Step(pb.StepRequest(model="lstm", session_id="alone", inputs=[_x(t)]))
            assert shared.seq == alone.seq == t + 1
            np.testing.assert_allclose(_y(shared), _y(alone), rtol=1e-5, atol=1e-6)
        # Every channel, whichever process it reached, steps its own session.
        channels = [channel for group in by_pid.values() for channel in group]
        for i, channel in enumerate(channels):
            stub = pb_grpc.RecurrentStub(channel)
            stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=f"c{i}"))
            reply = stub.Step(pb.StepRequest(model="lstm", session_id=f"c{i}", inputs=[_x(i)]))
            assert reply.seq == 1
        # The children serve no /metrics of their own: the supervisor does.
        assert "metrics on http" not in supervised.output()
        assert "metrics of all processes on http" in supervised.output()
    finally:
        _close_all(by_pid)


def test_one_metrics_endpoint_sums_both_processes(supervised: Supervised) -> None:
    pids = supervised.pids()
    by_pid = _channels_by_pid(supervised)
    try:
        counts = dict(zip(pids, (3, 5), strict=True))  # different: neither alone adds up
        stubs = {pid: pb_grpc.RecurrentStub(by_pid[pid][0]) for pid in pids}
        for pid in pids:
            stubs[pid].StartSession(pb.StartSessionRequest(model="lstm", session_id=f"m{pid}"))
        before = supervised.metrics()
        for pid, n in counts.items():
            for t in range(n):
                stubs[pid].Step(pb.StepRequest(model="lstm", session_id=f"m{pid}", inputs=[_x(t)]))
        after = supervised.metrics()
    finally:
        _close_all(by_pid)
    requests = (
        "rnnserve_requests_total",
        frozenset({"method": STEP, "model": "lstm", "code": "OK"}.items()),
    )
    steps = ("rnnserve_steps_total", frozenset({"model": "lstm", "version": "1"}.items()))
    assert after.get(requests, 0) - before.get(requests, 0) == sum(counts.values())
    assert after.get(steps, 0) - before.get(steps, 0) == sum(counts.values())
    loaded = ("rnnserve_models_loaded", frozenset({"model": "lstm", "version": "1"}.items()))
    assert after[loaded] == 1  # livemax over the live processes


def test_killed_process_is_replaced_then_sigterm_stops_all(
    model_repo: Path, redis_url: str
) -> None:
    server = Supervised(model_repo, redis_url)
    try:
        server.ready()
        victim, survivor = server.pids()
        with _channel(server.port) as channel:
            stub = pb_grpc.RecurrentStub(channel)
            stub.StartSession(pb.StartSessionRequest(model="lstm", session_id="long"))
            stub.Step(pb.StepRequest(model="lstm", session_id="long", inputs=[_x(0)]))
        os.kill(victim, signal.SIGKILL)
        server.wait_for(
            rf"WARNING .*server process {victim} exited unexpectedly "
            r"\(exit code -9 \(SIGKILL\)\): starting another"
        )
        started = server.wait_for(r"started server process (\d+) in its place")
        replacement = int(started.group(1))
        server.wait_for(LISTENING, count=3)
        assert sorted(server.pids()) == sorted([replacement, survivor])
        # Serving continues on both processes, and the session kept its state.
        by_pid = _channels_by_pid(server)
        try:
            assert by_pid[replacement] and by_pid[survivor]
            for seq, channels in enumerate(by_pid.values(), start=2):
                stub = pb_grpc.RecurrentStub(channels[0])
                reply = stub.Step(pb.StepRequest(model="lstm", session_id="long", inputs=[_x(1)]))
                assert reply.seq == seq
        finally:
            _close_all(by_pid)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.output()[-4000:]
        for pid in (replacement, survivor):
            assert not Path(f"/proc/{pid}").exists()
        assert "all processes exited (0, 0)" in server.output()
    finally:
        server.close()
