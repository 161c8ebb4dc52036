"""The client without the server: `pip install rnnserve` (no `[server]` extra).

Importing the SDK or the `rnnserve` command loads no TensorFlow, Keras, Redis, nor any
module of the server; and a fresh virtual environment with the wheel's base install
runs the README's client commands against a real server, while `rnnserve serve` there
says how to install the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import write_char_lstm
from tests.servers import spawned_server

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("tensorflow", "keras", "redis", "rnnserve.service", "rnnserve.core")


def _loaded_server_modules(code: str) -> list[str]:
    probe = "\n".join(
        [
            "import json, sys",
            code,
            f"names = {SERVER_ONLY!r}",
            "print(json.dumps(sorted(m for m in sys.modules",
            "    if any(m == n or m.startswith(n + '.') for n in names))))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    assert _loaded_server_modules("import rnnserve.client") == []


def test_the_rnnserve_command_loads_nothing_of_the_server() -> None:
    # `rnnserve client step --help`: the command tree is built and one command's help shown.
    code = (
        "from rnnserve.client import cli\n"
        "try:\n"
        "    cli.app(['client', 'step', '--help'])\n"
        "except SystemExit:\n"
        "    pass"
    )
    assert _loaded_server_modules(code) == []


def test_the_client_package_imports_no_server_module() -> None:
    """Source-level rule (docs/architecture.md): client/ names neither rnnserve.service
    nor rnnserve.core, and service/ and core/ never name rnnserve.client."""
    for folder, forbidden in (
        ("client", ("rnnserve.service", "rnnserve.core")),
        ("service", ("rnnserve.client",)),
        ("core", ("rnnserve.client", "rnnserve.service")),
        ("protocol", ("rnnserve.client", "rnnserve.service", "rnnserve.core")),
    ):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, (path, name)


# -- a fresh venv with the wheel's base install --------------------------------------------
@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding `pip install rnnserve-<version>.whl` (the base install only)."""
    root = tmp_path_factory.mktemp("client-only")
    source = root / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("core", "service", "client", "protocol"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    # The venv's own setuptools when it has one (offline); else pip's isolated build.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
         "-q", "-w", str(root / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    wheel = next((root / "dist").glob("rnnserve-*.whl"))
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "venv"


@pytest.fixture(scope="module")
def char_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with spawned_server(write_char_lstm(tmp_path_factory.mktemp("char-models"))) as address:
        yield address


def _run(venv_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    return subprocess.run(
        [str(venv_dir / "bin" / "rnnserve"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=venv_dir,
    )


@pytest.mark.slow
def test_base_install_has_no_server_dependencies(client_venv: Path) -> None:
    done = subprocess.run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    installed = {p["name"].lower() for p in json.loads(done.stdout)}
    assert "rnnserve" in installed
    assert {"numpy", "grpcio", "protobuf", "typer", "rich"} <= installed
    assert not installed & {"tensorflow", "keras", "redis", "pydantic-settings", "hiredis"}


@pytest.mark.slow
def test_base_install_runs_the_readme_client_commands(client_venv: Path, char_server: str) -> None:
    step = _run(
        client_venv, "client", "--address", char_server, "step", "char_lstm",
        "--json", '{"chars": 3}',
    )  # fmt: skip
    assert step.returncode == 0, step.stderr
    reply = json.loads(step.stdout)
    assert reply["seq"] == 1 and len(reply["outputs"]["logits"]) > 1
    generate = _run(
        client_venv, "client", "--address", char_server, "generate", "char_lstm",
        "--prompt", "serving ", "--length", "40",
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("serving ") and len(generate.stdout) == len("serving ") + 41
    models = _run(client_venv, "client", "--address", char_server, "models")
    assert models.returncode == 0, models.stderr
    assert [m["name"] for m in json.loads(models.stdout)] == ["char_lstm"]


@pytest.mark.slow
def test_base_install_says_the_server_is_not_installed(client_venv: Path) -> None:
    for command in (["serve", "--port", "0"], ["demo-model"]):
        done = _run(client_venv, *command)
        assert done.returncode == 2, done
        assert done.stderr == "error: the server is not installed: pip install 'rnnserve[server]'\n"
        assert "Traceback" not in done.stdout + done.stderr
