"""`rnnserve client ...` in a subprocess against a spawned `rnnserve serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.servers import FEATURES, close_output, reference, spawn_server, write_repository


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lstm`, `ctx`, and an (untrained) demo `char_lstm` with its vocabulary file."""
    from rnnserve.core.demo import VOCABULARY, build_char_lstm

    root = write_repository(tmp_path_factory.mktemp("cli-models"))
    keras.utils.set_random_seed(3)
    folder = root / "char_lstm" / "1"
    folder.mkdir(parents=True)
    build_char_lstm(units=16, embedding=8).save(folder / "model.keras")
    (root / "char_lstm" / "vocabulary.txt").write_text("".join(VOCABULARY))
    return root


@pytest.fixture(scope="module")
def address(cli_repo: Path) -> Iterator[str]:
    # No warm-up: each bucket compiles on first use, which these few calls hardly need.
    process, port = spawn_server(cli_repo, env={"RNNSERVE_WARMUP": "false"})
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)
        close_output(process)


def rnnserve_client(address: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.client.cli", "client", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode == 0) is ok, done.stderr
    return done


def test_models_and_signature(address):
    models = json.loads(rnnserve_client(address, "models").stdout)
    assert {m["name"] for m in models} == {"char_lstm", "ctx", "lstm"}
    signature = json.loads(rnnserve_client(address, "signature", "lstm").stdout)
    assert signature["inputs"] == [{"name": "x", "dtype": "float32", "shape": [FEATURES]}]


def test_step_run_info_end(address, cli_repo, tmp_path):
    xs = np.random.default_rng(8).normal(size=(70, FEATURES)).astype("float32")
    expected = reference(cli_repo, "lstm", xs[None])[0]

    first = json.loads(
        rnnserve_client(address, "step", "lstm", "--json", json.dumps({"x": xs[0].tolist()})).stdout
    )
    session = first["session_id"]
    second = json.loads(
        rnnserve_client(
            address, "step", "lstm", "--session", session, "--json", json.dumps(xs[1].tolist())
        ).stdout
    )
    assert (first["seq"], second["seq"]) == (1, 2)
    steps = np.array([first["outputs"]["y"], second["outputs"]["y"]], dtype="float32")
    np.testing.assert_allclose(steps, expected[:2], atol=1e-5)

    np.save(tmp_path / "rest.npy", xs[2:])
    ran = json.loads(
        rnnserve_client(
            address, "run", "lstm", "--session", session, "--input", str(tmp_path / "rest.npy")
        ).stdout
    )
    assert ran["seq"] == 70
    np.testing.assert_allclose(np.array(ran["outputs"]["y"]), expected[2:], atol=1e-5)

    info = json.loads(rnnserve_client(address, "info", "lstm", session).stdout)
    assert (info["seq"], info["model"]) == (70, "lstm")
    assert json.loads(rnnserve_client(address, "end", "lstm", session).stdout) == {"existed": True}
    missing = rnnserve_client(address, "info", "lstm", session, ok=False)
    assert "NOT_FOUND" in missing.stderr


def test_generate_with_the_char_model(address, cli_repo):
    vocabulary = (cli_repo / "char_lstm" / "vocabulary.txt").read_text()
    prompt, length = "serving ", 6
    done = rnnserve_client(
        address,
        "generate",
        "char_lstm",
        "--prompt",
        prompt,
        "--length",
        str(length),
        "--vocabulary",
        str(cli_repo / "char_lstm" / "vocabulary.txt"),
    )
    # The same greedy decoding offline: the most likely next character, fed back.
    model = keras.models.load_model(cli_repo / "char_lstm" / "1" / "model.keras", compile=False)
    tokens = [vocabulary.index(c) for c in prompt]
    for _ in range(length):
        logits = keras.ops.convert_to_numpy(model(np.array([tokens], dtype="int32")))[0, -1]
        tokens.append(int(np.argmax(logits)))
    assert done.stdout.strip("\n") == "".join(vocabulary[t] for t in tokens)


def test_errors_exit_1_with_the_code(address):
    done = rnnserve_client(address, "step", "no-such-model", "--json", "[1]", ok=False)
    assert done.returncode == 1
    assert done.stderr.startswith("error: NOT_FOUND")
