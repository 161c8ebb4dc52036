"""Private redis-servers for tests, one helper for all of them: a single server a test
may kill and restart (`RedisProcess`), a Redis Cluster (`redis_cluster`), a Sentinel
group (`SentinelGroup`), replica acknowledgements (`wait_replicas`), and the cleanup of
a namespace on the shared Redis (`delete_namespace`).

Each process is started on a free loopback port and killed by its own pid; the shared
Redis on 127.0.0.1:6379 (`MAIN_REDIS_URL`) is never flushed, configured or stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.ports import free_port

MAIN_REDIS_URL = "redis://127.0.0.1:6379/0"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return path


def _wait_ping(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with contextlib.suppress(
                redis.exceptions.ConnectionError, redis.exceptions.TimeoutError
            ):
                if client.ping():
                    return
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
    finally:
        client.close()


class RedisProcess:
    """A private redis-server on a spare loopback port; `aof=True`: appendfsync always.

    `kill()` + `start()` restarts it on the same port with the same data directory."""

    def __init__(self, directory: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            [*args, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_ping(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """SIGSTOP: the process is frozen (its sockets stay open, nothing answers)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT after `stop` (harmless otherwise)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@contextlib.contextmanager
def redis_cluster(
    directory: Path,
    masters: int = 3,
    *,
    replicas: int = 0,
    node_timeout_ms: int = 5000,
    extra: tuple[str, ...] = (),
) -> Iterator[list[RedisProcess]]:
    """`masters` redis-servers with cluster mode on (and `replicas` replicas of each),
    joined by `redis-cli --cluster create`. The list holds the masters first."""
    nodes = []
    try:
        for i in range(masters * (1 + replicas)):
            node = RedisProcess(
                directory / f"node{i}",
                extra=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(directory / f"node{i}" / "nodes.conf"),
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--repl-diskless-sync-delay", "0",
                    *extra,
                ),
            )  # fmt: skip
            node.start()
            nodes.append(node)
        subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas", str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        for node in nodes:
            client = node.client()
            while client.cluster("info")["cluster_state"] != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach state ok")
                time.sleep(0.1)
            client.close()
        # `--cluster create` picks which node becomes a master: put the masters first.
        roles = {}
        for node in nodes:
            client = node.client()
            roles[node.port] = client.info("replication")["role"]
            client.close()
        nodes.sort(key=lambda n: roles[n.port] != "master")
        for master in nodes[:masters]:
            wait_replicas(master, replicas)
        yield nodes
    finally:
        for node in nodes:
            node.cont()
            node.kill()


class SentinelGroup:
    """A master, `replicas` replicas and `sentinels` Sentinels (quorum: a majority),
    all private processes on loopback ports; the service is named `service`."""

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        service: str = "rnnserve",
    ) -> None:
        self.dir = directory
        self.service = service
        self.master = RedisProcess(directory / "master", extra=("--repl-diskless-sync-delay", "0"))
        self.replicas = [RedisProcess(directory / f"replica{i}") for i in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def addresses(self) -> str:
        """`host:port,...` of the Sentinels (the `--redis-sentinel` value)."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def __enter__(self) -> SentinelGroup:
        try:
            self.master.start()
            for replica in self.replicas:
                replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
                replica.extra += ("--repl-diskless-sync-delay", "0")
                replica.start()
            wait_replicas(self.master, len(self.replicas))
            quorum = len(self.sentinel_ports) // 2 + 1
            for i, port in enumerate(self.sentinel_ports):
                folder = self.dir / f"sentinel{i}"
                folder.mkdir(parents=True, exist_ok=True)
                conf = folder / "sentinel.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                    f"logfile {folder / 'sentinel.log'}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.service} {len(self.replicas)}\n"
                )
                process = subprocess.Popen(
                    [_binary("redis-server"), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                self.sentinels.append(process)
                _wait_ping(port, process)
            self.wait_agreed(self.master.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for server in [self.master, *self.replicas]:
            server.cont()
            server.kill()

    def named_masters(self) -> list[int | None]:
        """The master port each Sentinel names now (None: it does not answer)."""
        ports: list[int | None] = []
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                ports.append(int(client.sentinel_get_master_addr_by_name(self.service)[1]))
            except (redis.RedisError, TypeError):
                ports.append(None)
            finally:
                client.close()
        return ports

    def wait_agreed(self, port: int | None = None, timeout_s: float = 30) -> int:
        """Wait until every Sentinel names the same master (`port`, if given), and each
        knows the others and the replicas; returns its port."""
        deadline = time.monotonic() + timeout_s
        while True:
            named = self.named_masters()
            if named[0] is not None and len(set(named)) == 1 and port in (None, named[0]):
                states = []
                for sentinel_port in self.sentinel_ports:
                    client = redis.Redis(port=sentinel_port, socket_timeout=1)
                    try:
                        states.append(client.sentinel_master(self.service))
                    finally:
                        client.close()
                if all(
                    s["num-other-sentinels"] == len(self.sentinel_ports) - 1
                    and s["num-slaves"] >= len(self.replicas)
                    for s in states
                ):
                    return int(named[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinels do not agree on a master: {named}")
            time.sleep(0.1)

    def wait_agreed_change(self, old_port: int, timeout_s: float = 30) -> int:
        """Wait until a majority of the Sentinels name a master other than `old_port`."""
        deadline = time.monotonic() + timeout_s
        while True:
            named = [p for p in self.named_masters() if p is not None and p != old_port]
            if named and named.count(named[0]) > len(self.sentinel_ports) // 2:
                return named[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new master named: {self.named_masters()}")
            time.sleep(0.05)

    def server(self, port: int) -> RedisProcess:
        return next(s for s in [self.master, *self.replicas] if s.port == port)


def _key_on(client: redis.Redis) -> str:
    """A test key this server may write: on a Cluster node, one of a slot it owns."""
    if not int(client.info("cluster").get("cluster_enabled", 0)):
        return "rnnserve-test:replication-check"
    text = client.execute_command("CLUSTER", "NODES")
    text = text.decode() if isinstance(text, bytes) else str(text)
    mine = next(line.split() for line in text.splitlines() if "myself" in line.split()[2])
    ranges = [r.split("-") for r in mine[8:] if not r.startswith("[")]
    owned = [(int(r[0]), int(r[-1])) for r in ranges]
    for i in itertools.count():
        key = f"rnnserve-test:replication-check:{i}"
        if any(a <= key_slot(key.encode()) <= b for a, b in owned):
            return key
    raise AssertionError("unreachable")


def wait_replicas(master: RedisProcess, count: int, timeout_s: float = 30) -> None:
    """Wait until `count` replicas of the (private) `master` acknowledge a write: after
    a full sync a replica is "online" a moment before the master streams it writes."""
    if count == 0:
        return
    client = master.client()
    key = _key_on(client)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            client.set(key, time.time())
            acked = int(client.wait(count, 200))
            if acked >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{acked} of {count} replicas acknowledge writes")
    finally:
        client.close()


def commandstats(client: redis.Redis) -> dict[str, int]:
    """`{command: calls}` from INFO commandstats (e.g. `{"evalsha": 12, "get": 3}`)."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def delete_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"rnnserve:{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
