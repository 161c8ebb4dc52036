"""`rnnserve serve` that cannot start ends with one `error:` line on stderr and a non-zero
exit, no traceback and no drain lines for a server that never served: the real command
in a subprocess, one case per failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import write_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve.service.cli", "serve", "--host", "127.0.0.1",
         "--warmup", "false", *flags],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )  # fmt: skip


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), done.stderr[-2000:]
    assert text in lines[-1], lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert "draining" not in done.stderr + done.stdout  # it never served
    assert "listening on port" not in done.stdout


def test_port_in_use(repo: Path, busy_port: int) -> None:
    done = serve("--model-repository", str(repo), "--port", str(busy_port))
    assert_one_error_line(done, 1, f"cannot listen on 127.0.0.1:{busy_port}: the port is in use")


def test_missing_repository(tmp_path: Path) -> None:
    done = serve("--model-repository", str(tmp_path / "nope"), "--port", "0")
    assert_one_error_line(done, 1, f"model repository {tmp_path / 'nope'} is not a folder")


def test_empty_repository(tmp_path: Path) -> None:
    done = serve("--model-repository", str(tmp_path), "--port", "0")
    assert_one_error_line(done, 1, "holds no <name>/<version>/model.keras")


def test_no_model_loadable(tmp_path: Path) -> None:
    folder = tmp_path / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"not a keras file")
    done = serve("--model-repository", str(tmp_path), "--port", "0")
    assert_one_error_line(done, 1, "all 1 model version(s) failed to load")
    assert "could not load model broken version 1" in done.stderr  # the log says why


def test_unreadable_tls_files(repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "server.key"
    done = serve(
        "--model-repository", str(repo), "--port", "0",
        "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(missing),
    )  # fmt: skip
    assert_one_error_line(done, 1, f"cannot read the TLS key file {missing}")


def test_bad_store_settings(repo: Path) -> None:
    done = serve("--model-repository", str(repo), "--port", "0", "--redis-min-replicas-ack", "1")
    assert_one_error_line(done, 2, "the memory store has no replicas")


def test_bad_setting(repo: Path) -> None:
    done = serve("--model-repository", str(repo), "--port", "0",
                 env={"RNNSERVE_MAX_BATCH_SIZE": "lots"})  # fmt: skip
    assert_one_error_line(done, 2, "max_batch_size")
