"""What `rnnserve serve` says when it starts, and what it leaves out, from the real
command: the start log (version, Python, pid, settings not at their defaults with
secrets as ***, the store, the ports, the models), no TensorFlow native INFO lines
(in the server and its compute children) except at --log-level DEBUG, and the
multiprocess metrics folder cleaned of a SIGKILLed server's files."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import IO

import pytest

from tests.models import write_repository
from tests.ports import free_port

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-never-logged"
NATIVE_NOISE = ("I0000 ", "absl::InitializeLog", "Could not find cuda drivers", "oneDNN")


@dataclass
class Served:
    process: subprocess.Popen[str]
    log: Path
    port: int
    metrics_port: int

    def stderr(self) -> str:
        return self.log.read_text()

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def stop(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(repo: Path, log: Path, multiproc: Path, *flags: str) -> Served:
    """`rnnserve serve` in a subprocess, once it logged that it serves."""
    metrics_port = free_port()
    with log.open("w") as err:  # the child keeps its own copy
        process = _popen(repo, err, metrics_port, multiproc, flags)
    assert process.stdout is not None
    line = process.stdout.readline()  # "rnnserve listening on port N", once serving
    match = re.fullmatch(r"rnnserve listening on port (\d+)\n", line)
    if match is None:
        process.kill()
        process.wait()
        process.stdout.close()
        pytest.fail(f"the server did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Served(process, log, int(match.group(1)), metrics_port)


def _popen(
    repo: Path, err: IO[str], metrics_port: int, multiproc: Path, flags: tuple[str, ...]
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rnnserve.service.cli", "serve", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", str(metrics_port), "--warmup", "false",
         "--model-repository", str(repo), *flags],
        stdout=subprocess.PIPE, stderr=err, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
             "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startlog")
    both = write_repository(root / "both")
    only_lstm = root / "only_lstm"
    shutil.copytree(both / "lstm", only_lstm / "lstm")
    multiproc = root / "multiproc"
    multiproc.mkdir()
    # What a server killed long ago left: gone once the first live process starts.
    (multiproc / "gauge_livesum_4194000.db").write_bytes(b"stale")
    (multiproc / "rnnserve-metrics-dead").mkdir()
    return {"both": both, "only_lstm": only_lstm, "multiproc": multiproc, "root": root}


@pytest.fixture(scope="module")
def first(folders: dict[str, Path], redis_url: str) -> Iterator[Served]:
    served = start(
        folders["both"],
        folders["root"] / "first.log",
        folders["multiproc"],
        "--compute-process", "true",
        "--auth-tokens", f"{TOKEN}=startlog",
        "--redis-url", redis_url,
        "--namespace", f"startlog-{os.getpid()}",
    )  # fmt: skip
    yield served
    served.stop()


def test_the_start_log_names_version_settings_store_ports_and_models(
    first: Served, redis_url: str
) -> None:
    log = first.stderr()
    python = platform.python_version()
    assert f"rnnserve {version('rnnserve')} (Python {python}, pid {first.process.pid})" in log
    (settings,) = re.findall(r"settings not at their defaults: (.*)", log)
    assert {"host=127.0.0.1", "port=0", "warmup=False", "compute_process=True"} <= set(
        settings.split(", ")
    )
    assert f"metrics_port={first.metrics_port}" in settings
    assert "auth_tokens=***" in settings
    assert TOKEN not in log  # the secret is never printed
    assert "max_batch_size" not in settings  # at its default
    assert f"state store: Redis at {redis_url}, namespace 'startlog-" in log
    assert f"listening on 127.0.0.1:{first.port} (plaintext, 2 acceptor(s))" in log
    assert f"metrics on http://127.0.0.1:{first.metrics_port}/metrics" in log
    assert (
        f"serving 2 model(s) on 127.0.0.1:{first.port}: "
        "ctx (version(s) 1, default 1); lstm (version(s) 1, default 1)"
    ) in log
    assert "metrics folder" in log and "first live process; removed 2 stale file(s)" in log


def test_no_native_info_lines_in_the_server_or_its_compute_processes(first: Served) -> None:
    log = first.stderr()
    assert log.count("compute process") >= 2  # both children started (and imported TF)
    for noise in NATIVE_NOISE:
        assert noise not in log, log
    assert "Traceback" not in log


def test_a_killed_servers_gauges_are_gone_after_a_restart(
    first: Served, folders: dict[str, Path]
) -> None:
    loaded = 'rnnserve_models_loaded{model="ctx",version="1"} 1.0'
    assert loaded in first.scrape()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    stale = [p.name for p in folders["multiproc"].iterdir() if p.name.endswith(".db")]
    assert any(str(first.process.pid) in name for name in stale)  # what kill -9 left
    second = start(
        folders["only_lstm"],
        folders["root"] / "second.log",
        folders["multiproc"],
        "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        text = second.scrape()
        assert 'rnnserve_models_loaded{model="lstm",version="1"} 1.0' in text
        assert 'model="ctx"' not in text  # the dead server's samples are not reported
        log = second.stderr()
        assert "first live process" in log
        # At DEBUG nothing is held back: TensorFlow's native INFO lines come through.
        assert "I0000 " in log and "Could not find cuda drivers" in log
    finally:
        second.stop()
