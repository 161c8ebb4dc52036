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

from tests.models import FEATURES, reference, write_char_lstm, write_repository
from tests.servers import spawned_server


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lstm`, `ctx`, and an (untrained) demo `char_lstm` with its vocabulary metadata."""
    return write_char_lstm(write_repository(tmp_path_factory.mktemp("cli-models")))


@pytest.fixture(scope="module")
def address(cli_repo: Path) -> Iterator[str]:
    # No warm-up: each bucket compiles on first use, which these few calls hardly need.
    with spawned_server(cli_repo) as running:
        yield running


def rnnserve_client(
    address: str, *args: str, ok: bool | None = True
) -> subprocess.CompletedProcess[str]:
    """`rnnserve client --address ADDRESS ARGS...`; `ok`: it must succeed (True), fail
    (False), or either (None)."""
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.client.cli", "client", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok is not None:
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
    # Ending twice is fine (docs/protocol.md): the answer says there was nothing to end.
    again = rnnserve_client(address, "end", "lstm", session)
    assert json.loads(again.stdout) == {"existed": False}


def test_generate_takes_the_vocabulary_from_the_signature(address, cli_repo, tmp_path):
    from rnnserve.core.demo import VOCABULARY

    vocabulary = "".join(VOCABULARY)
    signature = json.loads(rnnserve_client(address, "signature", "char_lstm").stdout)
    assert signature["metadata"] == {"vocabulary": vocabulary}
    prompt, length = "serving ", 6
    # Run from a folder with no models/ in it: nothing is read from the current folder.
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.client.cli", "client", "--address", address,
         "generate", "char_lstm", "--prompt", prompt, "--length", str(length)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
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


# -- a CLI that never surprises -----------------------------------------------------------
def step_lstm(address: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    x = json.dumps({"x": [0.5] * FEATURES})
    return rnnserve_client(address, "step", "lstm", "--json", x, *args, ok=ok)


def one_error_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code`, printing exactly one `error:` line, no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def session_exists(address: str, session_id: str) -> bool:
    return rnnserve_client(address, "info", "lstm", session_id, ok=None).returncode == 0


def test_a_session_that_does_not_exist_is_not_created(address):
    line = one_error_line(step_lstm(address, "--session", "cli-nope", ok=False), 1)
    assert line.startswith("error: NOT_FOUND: ") and "--start" in line
    assert not session_exists(address, "cli-nope")
    started = json.loads(step_lstm(address, "--session", "cli-yes", "--start").stdout)
    assert (started["session_id"], started["seq"]) == ("cli-yes", 1)
    # --start continues a session that exists: it never restarts one.
    assert json.loads(step_lstm(address, "--session", "cli-yes", "--start").stdout)["seq"] == 2


def test_an_ended_session_is_not_recreated(address):
    session = json.loads(step_lstm(address).stdout)["session_id"]
    rnnserve_client(address, "end", "lstm", session)
    one_error_line(step_lstm(address, "--session", session, ok=False), 1)
    assert not session_exists(address, session)


def test_constants_on_a_live_session_are_refused_with_a_hint_to_reset(address):
    started = json.loads(
        rnnserve_client(address, "start", "ctx", "--constants", '{"context": [1, 0]}').stdout
    )
    session = started["session_id"]
    x = json.dumps([0.1] * FEATURES)
    rnnserve_client(address, "step", "ctx", "--session", session, "--json", x)
    refused = rnnserve_client(
        address, "step", "ctx", "--session", session, "--json", x,
        "--constants", '{"context": [0, 1]}', ok=False,
    )  # fmt: skip
    line = one_error_line(refused, 2)
    assert "is live (seq 1)" in line and f"rnnserve client reset ctx {session}" in line
    info = json.loads(rnnserve_client(address, "info", "ctx", session).stdout)
    assert info["seq"] == 1  # the live session was not restarted

    reset = json.loads(
        rnnserve_client(
            address, "reset", "ctx", session, "--constants", '{"context": [0, 1]}'
        ).stdout
    )
    assert (reset["session_id"], reset["seq"]) == (session, 0)


def test_another_version_on_a_live_session_is_refused(address):
    session = json.loads(step_lstm(address).stdout)["session_id"]
    line = one_error_line(step_lstm(address, "--session", session, "--version", "7", ok=False), 2)
    assert "live on version '1'" in line and "--version applies to a new session only" in line
    # The session's own version is no surprise.
    assert json.loads(step_lstm(address, "--session", session, "--version", "1").stdout)["seq"] == 2


def test_start_refuses_an_id_that_is_a_session(address):
    session = json.loads(step_lstm(address).stdout)["session_id"]
    line = one_error_line(
        rnnserve_client(address, "start", "lstm", "--session", session, ok=False), 2
    )
    assert "rnnserve client reset lstm" in line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3.5", "expected int32 (integers), got float64 values (e.g. 3.5)"),
        ('"a"', "expected int32 values, got str32"),
        ("NaN", "e.g. nan"),
    ],
    ids=["fraction", "text", "nan"],
)
def test_inputs_are_converted_by_lossless_casts_only(address, value, message):
    done = rnnserve_client(
        address, "step", "char_lstm", "--json", f'{{"chars": {value}}}', ok=False
    )
    line = one_error_line(done, 2)
    assert "input 'chars'" in line and message in line
    assert "session" not in line  # refused before any session was started


def test_a_float_npy_for_an_int_model_is_refused(address, tmp_path):
    np.save(tmp_path / "floats.npy", np.array([1.0, 2.0, 3.0], "float32"))
    done = rnnserve_client(
        address, "run", "char_lstm", "--input", str(tmp_path / "floats.npy"), ok=False
    )
    line = one_error_line(done, 2)
    assert "got float32 values" in line
    ints = tmp_path / "ints.npy"
    np.save(ints, np.array([1, 2, 3], "int64"))  # int64 values that fit int32: lossless
    ran = json.loads(rnnserve_client(address, "run", "char_lstm", "--input", str(ints)).stdout)
    assert ran["seq"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["step", "lstm", "--json", "{not json"], "--json: not valid JSON"),
        (["step", "lstm", "--json", "[1]", "--constants", "{"], "--constants: not valid JSON"),
        (["reset", "lstm", "s", "--constants", "]"], "--constants: not valid JSON"),
    ],
    ids=["json", "constants", "reset"],
)
def test_malformed_json_is_one_error_line(address, args, message):
    assert message in one_error_line(rnnserve_client(address, *args, ok=False), 2)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "[1, 2", "cannot read it"),
        ("bad.npy", "not an npy file", "cannot read it"),
        ("empty.json", "[]", "no steps"),
        ("scalar.json", "3", "no steps"),
        ("empty.npy", None, "no steps"),
    ],
)
def test_bad_or_empty_sequence_files_are_one_error_line(address, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((0, FEATURES), "float32"))
    else:
        path.write_text(content)
    done = rnnserve_client(address, "run", "lstm", "--input", str(path), ok=False)
    assert message in one_error_line(done, 2)


def test_a_session_started_for_a_failed_call_is_ended(address):
    bad = json.dumps({"x": [0.5] * (FEATURES + 1)})  # the server refuses the shape
    done = rnnserve_client(
        address, "step", "lstm", "--session", "cli-orphan", "--start", "--json", bad, ok=False
    )
    line = one_error_line(done, 1)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "the session 'cli-orphan' started for this call was ended" in line
    assert not session_exists(address, "cli-orphan")
    # A session that existed before the call is left as it was.
    session = json.loads(step_lstm(address).stdout)["session_id"]
    failed = rnnserve_client(address, "step", "lstm", "--session", session, "--json", bad, ok=False)
    assert "started for this call" not in one_error_line(failed, 1)
    assert session_exists(address, session)


def test_generate_prints_as_it_goes(address):
    """The prompt is on stdout before the last character is generated: stdout is read
    while the command runs, and the first bytes arrive before it has finished."""
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "rnnserve.client.cli", "client", "--address", address,
         "generate", "char_lstm", "--prompt", "serving ", "--length", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.read(8)
        assert first == "serving "
        assert process.poll() is None  # still generating
        rest = process.stdout.read()
        assert process.wait(timeout=120) == 0
        assert len(rest.rstrip("\n")) == 400
    finally:
        process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_generate_without_a_vocabulary_is_one_error_line(address):
    done = rnnserve_client(address, "generate", "lstm", ok=False)
    assert "has no `vocabulary` in its signature's metadata" in one_error_line(done, 2)
