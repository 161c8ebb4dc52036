"""`tritonclient` (Triton's own Python client, grpc and grpc.aio) drives rnnserve unchanged.

KServe v2 / Triton sequence protocol: a sequence is a session; `sequence_id` (uint64 or
string) names it, `sequence_start` starts it, `sequence_end` ends it after its step. Every
test runs against a real server (a `ServerThread` on port 0) with the memory store and
with the Redis store; outputs are compared with the offline core reference.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from rnnserve.core import RecurrentModel
from tests.models import CONTEXT, FEATURES, OUTPUTS, reference, write_repository
from tests.servers import ServerThread

N_SEQUENCES = 64  # of each id kind
MAX_STEPS = 5
WAIT_S = 120.0  # a guard against a hang, not a timing assertion


# -- setup ---------------------------------------------------------------------------------
def _scalar_model() -> keras.Model:
    """`scalar`: one float per step in, one float per step out (per-sample shape ())."""
    x_t = keras.Input((), name="x")
    h = keras.Input((2,), name="h")
    out, [h_t] = keras.layers.SimpleRNNCell(2, name="cell")(keras.layers.Reshape((1,))(x_t), [h])
    y = keras.layers.Reshape((), name="y")(keras.layers.Dense(1, name="dense")(out))
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=h,
        sequence_outputs=y,
        state_outputs=h_t,
        return_sequences=True,
        name="scalar_rnn",
    )
    xs = keras.Input((None,), name="xs")
    return keras.Model(xs, rnn(xs), name="scalar_model")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_repository(tmp_path_factory.mktemp("triton-models"))
    folder = root / "scalar" / "1"
    folder.mkdir(parents=True)
    _scalar_model().save(folder / "model.keras")
    (folder / "config.yaml").write_text("max_batch_size: 8\nmax_queue_delay_ms: 2\n")
    return root


@pytest.fixture(scope="module", params=["memory", "redis"])
def address(request: pytest.FixtureRequest, repo: Path) -> Iterator[str]:
    from rnnserve.service.settings import Settings

    options: dict[str, Any] = {"model_repository": repo, "port": 0, "host": "127.0.0.1"}
    if request.param == "redis":
        options["redis_url"] = request.getfixturevalue("redis_url")
        options["namespace"] = f"triton-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with ServerThread(Settings(**options)) as server:
        yield server.address


@pytest.fixture
def client(address: str) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(address) as triton:
        yield triton


# -- sequences and their expected outputs ---------------------------------------------------
@dataclass
class Sequence:
    sequence_id: int | str
    model: str
    xs: np.ndarray  # (steps, FEATURES)
    expected: np.ndarray  # (steps, OUTPUTS)
    context: np.ndarray | None
    row: int  # of the module's inputs


@pytest.fixture(scope="module")
def expected_outputs(repo: Path) -> dict[str, Any]:
    """Inputs and offline outputs for 2 * N_SEQUENCES sequences (lstm, and ctx with constants)."""
    rng = np.random.default_rng(7)
    n = 2 * N_SEQUENCES
    xs = rng.normal(size=(n, MAX_STEPS, FEATURES)).astype(np.float32)
    contexts = rng.normal(size=(n, CONTEXT)).astype(np.float32)
    return {
        "xs": xs,
        "contexts": contexts,
        "lstm": reference(repo, "lstm", xs),
        "ctx": reference(repo, "ctx", xs, contexts),
        # row k: the inputs of row n-1-k with the context of row k
        "ctx_reversed": reference(repo, "ctx", xs[::-1], contexts),
        "lengths": rng.integers(2, MAX_STEPS + 1, size=n),
    }


def make_sequences(expected: dict[str, Any]) -> list[Sequence]:
    """64 uint64-id sequences and 64 string-id sequences, of 2 to MAX_STEPS steps each;
    every fourth uses the `ctx` model (its constant comes with the START request).
    Ids are fresh per call, as the module's server is shared by the tests."""
    base = random.getrandbits(40) + 1
    tag = uuid.uuid4().hex[:8]
    sequences = []
    for i in range(2 * N_SEQUENCES):
        sequence_id: int | str = base + i if i < N_SEQUENCES else f"{tag}-seq-{i}"
        length = int(expected["lengths"][i])
        model = "ctx" if i % 4 == 3 else "lstm"
        sequences.append(
            Sequence(
                sequence_id,
                model,
                expected["xs"][i, :length],
                expected[model][i, :length],
                expected["contexts"][i] if model == "ctx" else None,
                i,
            )
        )
    return sequences


def interleaved(sequences: list[Sequence]) -> list[list[dict[str, Any]]]:
    """`infer` keyword arguments round by round: round t holds step t of every sequence
    that long, in shuffled order, with start/end flags and a request id `i:t`."""
    rng = random.Random(11)
    rounds = []
    for t in range(MAX_STEPS):
        order = [i for i, s in enumerate(sequences) if len(s.xs) > t]
        rng.shuffle(order)
        rounds.append([request_kwargs(sequences[i], i, t) for i in order])
    return rounds


def x_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    array = np.asarray(x, dtype=np.float32)[None]
    tensor = tc.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def request_kwargs(sequence: Sequence, i: int, t: int) -> dict[str, Any]:
    inputs = [x_input(sequence.xs[t])]
    if t == 0 and sequence.context is not None:
        inputs.append(x_input(sequence.context, "context"))
    return {
        "model_name": sequence.model,
        "inputs": inputs,
        "request_id": f"{i}:{t}",
        "sequence_id": sequence.sequence_id,
        "sequence_start": t == 0,
        "sequence_end": t == len(sequence.xs) - 1,
    }


def check_results(sequences: list[Sequence], results: dict[str, tc.InferResult]) -> None:
    expected_ids = {f"{i}:{t}" for i, s in enumerate(sequences) for t in range(len(s.xs))}
    assert set(results) == expected_ids
    for i, sequence in enumerate(sequences):
        got = np.stack([results[f"{i}:{t}"].as_numpy("y")[0] for t in range(len(sequence.xs))])
        np.testing.assert_allclose(got, sequence.expected, rtol=1e-4, atol=1e-5)
        response = results[f"{i}:0"].get_response()
        assert response.model_name == sequence.model
        assert response.model_version == "1"


def assert_all_ended(client: tc.InferenceServerClient, sequences: list[Sequence]) -> None:
    """After sequence_end, a request without START for the id fails: the session is gone."""
    for sequence in sequences:
        with pytest.raises(InferenceServerException) as info:
            client.infer(
                sequence.model,
                [x_input(sequence.xs[0])],
                sequence_id=sequence.sequence_id,
            )
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


class StreamCollector:
    """A `start_stream` callback: results by request id; errors in arrival order."""

    def __init__(self) -> None:
        self.results: dict[str, tc.InferResult] = {}
        self.errors: list[InferenceServerException] = []
        self.arrivals: queue.Queue[tc.InferResult | InferenceServerException] = queue.Queue()

    def __call__(
        self, result: tc.InferResult | None, error: InferenceServerException | None
    ) -> None:
        if error is not None:
            self.errors.append(error)
            self.arrivals.put(error)
        else:
            assert result is not None
            self.results[result.get_response().id] = result
            self.arrivals.put(result)

    def next(self) -> tc.InferResult | InferenceServerException:
        return self.arrivals.get(timeout=WAIT_S)


# -- protocol surface ------------------------------------------------------------------------
def _field_mismatches(ours: Any, theirs: Any, path: str) -> list[str]:
    problems = []
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        if other is None:
            problems.append(f"{path}.{field.name}: not in Triton's proto")
            continue
        if (field.number, field.type, field.is_repeated) != (
            other.number,
            other.type,
            other.is_repeated,
        ):
            problems.append(f"{path}.{field.name}: number/type/label differ")
        if field.message_type is not None:
            problems += _field_mismatches(
                field.message_type, other.message_type, f"{path}.{field.name}"
            )
        if field.enum_type is not None:
            for value in field.enum_type.values:
                twin = other.enum_type.values_by_name.get(value.name)
                if twin is None or twin.number != value.number:
                    problems.append(f"{path}.{field.name}: enum value {value.name} differs")
    return problems


def test_protos_are_wire_compatible_with_triton() -> None:
    """Every message, field, enum value and RPC we declare has Triton's number and type."""
    from rnnserve.protocol.inference import grpc_service_pb2, model_config_pb2

    problems = []
    for ours, theirs in (
        (grpc_service_pb2, triton_pb2),
        (model_config_pb2, triton_config_pb2),
    ):
        for name, message in ours.DESCRIPTOR.message_types_by_name.items():
            problems += _field_mismatches(
                message, theirs.DESCRIPTOR.message_types_by_name[name], name
            )
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton_service = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        twin = triton_service.methods_by_name[method.name]
        assert (twin.input_type.full_name, twin.output_type.full_name) == (
            method.input_type.full_name,
            method.output_type.full_name,
        )
        assert (twin.client_streaming, twin.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )
    assert problems == []


def test_health_and_server_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("lstm")
    assert client.is_model_ready("ctx", "1")
    assert not client.is_model_ready("lstm", "9")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata()
    assert metadata.name == "rnnserve"
    assert "sequence" in metadata.extensions
    assert client.get_server_metadata(as_json=True)["name"] == "rnnserve"
    with pytest.raises(InferenceServerException) as info:  # an RPC rnnserve does not serve
        client.get_inference_statistics("lstm")
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("ctx")
    assert isinstance(metadata, triton_pb2.ModelMetadataResponse)  # decoded by Triton's proto
    assert metadata.versions == ["1"]
    shapes = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert shapes == {"x": ("FP32", [-1, FEATURES]), "context": ("FP32", [-1, CONTEXT])}
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("y", "FP32", [-1, OUTPUTS])
    ]
    as_json = client.get_model_metadata("lstm", "1", as_json=True)
    assert as_json["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", str(FEATURES)]}]

    config = client.get_model_config("ctx").config
    assert isinstance(config, triton_config_pb2.ModelConfig)
    assert config.name == "ctx"
    assert config.max_batch_size > 0
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    inputs = {i.name: i for i in config.input}
    assert list(inputs["x"].dims) == [FEATURES]
    assert inputs["x"].data_type == triton_config_pb2.TYPE_FP32
    assert inputs["context"].optional
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [OUTPUTS])]
    assert [s.input_name for s in config.sequence_batching.state] == ["h"]
    as_json = client.get_model_config("lstm", as_json=True)["config"]
    assert as_json["input"][0]["data_type"] == "TYPE_FP32"
    assert "sequence_batching" in as_json

    # A scalar per sample: Triton's dims [1] + reshape [] in the config, [-1] in metadata.
    scalar = client.get_model_config("scalar").config
    assert list(scalar.input[0].dims) == [1]
    assert scalar.input[0].HasField("reshape")
    assert list(scalar.input[0].reshape.shape) == []
    assert list(client.get_model_metadata("scalar").inputs[0].shape) == [-1]

    for call in (client.get_model_metadata, client.get_model_config):
        with pytest.raises(InferenceServerException) as info:
            call("no_such_model")
        assert info.value.status() == "StatusCode.NOT_FOUND"


# -- 128 interleaved sequences ---------------------------------------------------------------
def test_sync_stream_interleaved_sequences(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """All requests of 128 sequences go into one stream at once (every sequence's steps
    pipelined behind its START); responses are matched by request id."""
    sequences = make_sequences(expected_outputs)
    collector = StreamCollector()
    client.start_stream(callback=collector)
    try:
        total = 0
        for round_ in interleaved(sequences):
            for kwargs in round_:
                client.async_stream_infer(**kwargs)
                total += 1
        for _ in range(total):
            collector.next()
    finally:
        client.stop_stream()
    assert collector.errors == []
    check_results(sequences, collector.results)
    assert_all_ended(client, sequences)


def test_sync_stream_back_to_back_steps_and_restarts(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """In one stream, each sequence's requests follow each other directly: START, steps,
    END, then START again for the same id (a fresh state) on other inputs, steps and END.
    The requests of one sequence take effect in the order sent, although the server runs
    a stream's requests concurrently."""
    sequences = make_sequences(expected_outputs)[:: N_SEQUENCES // 8]  # 8 uint64, 8 string
    plans = []  # (request id, sequence, x, expected y, start, end)
    for sequence in sequences:
        k = sequence.row
        again_xs = expected_outputs["xs"][-1 - k, :3]  # the module's inputs, reversed rows
        again_ys = expected_outputs["lstm" if sequence.model == "lstm" else "ctx_reversed"]
        again_ys = again_ys[-1 - k if sequence.model == "lstm" else k, :3]
        for name, xs, ys in (("a", sequence.xs, sequence.expected), ("b", again_xs, again_ys)):
            for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
                plans.append((f"{k}{name}{t}", sequence, x, y, t == 0, t == len(xs) - 1))
    collector = StreamCollector()
    client.start_stream(callback=collector)
    try:
        for request_id, sequence, x, _, start, end in plans:
            inputs = [x_input(x)]
            if start and sequence.context is not None:
                inputs.append(x_input(sequence.context, "context"))
            client.async_stream_infer(
                sequence.model,
                inputs,
                request_id=request_id,
                sequence_id=sequence.sequence_id,
                sequence_start=start,
                sequence_end=end,
            )
        for _ in plans:
            collector.next()
    finally:
        client.stop_stream()
    assert collector.errors == []
    for request_id, _, _, y, _, _ in plans:
        got = collector.results[request_id].as_numpy("y")[0]
        np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5, err_msg=request_id)
    assert_all_ended(client, sequences)


async def test_aio_infer_concurrent_sequences(
    address: str, client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """grpc.aio `infer`: each round's requests (one step of every live sequence) run
    concurrently with asyncio.gather."""
    sequences = make_sequences(expected_outputs)
    results: dict[str, tc.InferResult] = {}
    async with tc_aio.InferenceServerClient(address) as triton:
        for round_ in interleaved(sequences):
            answers = await asyncio.gather(*(triton.infer(**kwargs) for kwargs in round_))
            for kwargs, answer in zip(round_, answers, strict=True):
                assert answer.get_response().id == kwargs["request_id"]
                results[kwargs["request_id"]] = answer
    check_results(sequences, results)
    assert_all_ended(client, sequences)


async def test_aio_stream_infer_sequences(
    address: str, client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """grpc.aio `stream_infer`: one stream carries every request of the 128 sequences."""
    sequences = make_sequences(expected_outputs)
    rounds = interleaved(sequences)
    total = sum(len(r) for r in rounds)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for round_ in rounds:
            for kwargs in round_:
                yield kwargs

    results: dict[str, tc.InferResult] = {}
    async with tc_aio.InferenceServerClient(address) as triton:
        responses = triton.stream_infer(requests())
        async for result, error in responses:
            assert error is None, error
            results[result.get_response().id] = result
            if len(results) == total:
                break
        responses.cancel()
    check_results(sequences, results)
    assert_all_ended(client, sequences)


# -- sequence semantics ----------------------------------------------------------------------
def test_end_then_request_fails_and_start_restarts(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    xs = expected_outputs["xs"][0]
    want = expected_outputs["lstm"][0]
    sequence_id = random.getrandbits(40) + 1

    def step(t: int, **flags: bool) -> np.ndarray:
        answer = client.infer("lstm", [x_input(xs[t])], sequence_id=sequence_id, **flags)
        return answer.as_numpy("y")[0]

    np.testing.assert_allclose(step(0, sequence_start=True), want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step(1), want[1], rtol=1e-4, atol=1e-5)
    # START on a live sequence restarts it from the initial state.
    np.testing.assert_allclose(step(0, sequence_start=True), want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step(1, sequence_end=True), want[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(InferenceServerException) as info:
        step(2)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "START" in info.value.message()
    np.testing.assert_allclose(step(0, sequence_start=True), want[0], rtol=1e-4, atol=1e-5)
    # One request both starts and ends a sequence.
    np.testing.assert_allclose(
        step(0, sequence_start=True, sequence_end=True), want[0], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(InferenceServerException):
        step(1)


def test_repeated_request_id_is_not_a_retry(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """Triton request ids are labels: the same id on every step still applies every step."""
    xs = expected_outputs["xs"][1]
    sequence_id = f"same-id-{uuid.uuid4().hex[:8]}"
    got = [
        client.infer(
            "lstm",
            [x_input(xs[t])],
            request_id="r",
            sequence_id=sequence_id,
            sequence_start=t == 0,
            sequence_end=t == MAX_STEPS - 1,
        ).as_numpy("y")[0]
        for t in range(MAX_STEPS)
    ]
    np.testing.assert_allclose(np.stack(got), expected_outputs["lstm"][1], rtol=1e-4, atol=1e-5)


def test_constants_come_with_start_only(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    xs, context = expected_outputs["xs"][2], expected_outputs["contexts"][2]
    sequence_id = random.getrandbits(40) + 1
    with pytest.raises(InferenceServerException) as info:  # START without the constant
        client.infer("ctx", [x_input(xs[0])], sequence_id=sequence_id, sequence_start=True)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "context" in info.value.message()
    first = client.infer(
        "ctx",
        [x_input(xs[0]), x_input(context, "context")],
        sequence_id=sequence_id,
        sequence_start=True,
    )
    with pytest.raises(InferenceServerException) as info:  # the constant again, mid-sequence
        client.infer("ctx", [x_input(xs[1]), x_input(context, "context")], sequence_id=sequence_id)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    second = client.infer("ctx", [x_input(xs[1])], sequence_id=sequence_id, sequence_end=True)
    got = np.stack([first.as_numpy("y")[0], second.as_numpy("y")[0]])
    np.testing.assert_allclose(got, expected_outputs["ctx"][2, :2], rtol=1e-4, atol=1e-5)


def test_scalar_input_as_shape_1_or_1x1(client: tc.InferenceServerClient, repo: Path) -> None:
    """A per-sample scalar input is sent as [1] (batch of one scalar) or, following the
    config's dims [1], as [1, 1]; the output is [1]."""
    xs = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    model = keras.models.load_model(repo / "scalar" / "1" / "model.keras", compile=False)
    want = keras.ops.convert_to_numpy(model(xs))[0]
    sequence_id = random.getrandbits(40) + 1
    got = []
    for t, x in enumerate(xs[0]):
        shape = [1] if t % 2 == 0 else [1, 1]
        tensor = tc.InferInput("x", shape, "FP32")
        tensor.set_data_from_numpy(np.full(shape, x, dtype=np.float32))
        answer = client.infer(
            "scalar",
            [tensor],
            sequence_id=sequence_id,
            sequence_start=t == 0,
            sequence_end=t == len(xs[0]) - 1,
        )
        assert list(answer.get_output("y").shape) == [1]
        got.append(answer.as_numpy("y")[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_uint64_ids_beyond_int64_and_int64_bits(address: str, repo: Path) -> None:
    """Triton reads an int64 id as the uint64 of the same bits: tritonclient's int64 -1
    and a raw uint64 2**64 - 1 name one sequence. Inputs come as raw bytes or contents."""
    x = np.ones((1, FEATURES), dtype=np.float32)
    with tc.InferenceServerClient(address) as triton:
        triton.infer("lstm", [x_input(x[0])], sequence_id=-1, sequence_start=True)
    with grpc.insecure_channel(address) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = triton_pb2.ModelInferRequest(
            model_name="lstm",
            inputs=[
                triton_pb2.ModelInferRequest.InferInputTensor(
                    name="x", datatype="FP32", shape=[1, FEATURES]
                )
            ],
            raw_input_contents=[x.tobytes()],
        )
        request.parameters["sequence_id"].uint64_param = 2**64 - 1
        response = stub.ModelInfer(request)  # the second step of the same sequence
        assert [o.name for o in response.outputs] == ["y"]
        # The same input as typed `contents` instead of raw bytes.
        del request.raw_input_contents[:]
        request.inputs[0].contents.fp32_contents.extend(x[0].tolist())
        request.parameters["sequence_end"].bool_param = True
        again = stub.ModelInfer(request)
        want = reference(repo, "lstm", np.ones((1, 3, FEATURES), dtype=np.float32))[0]
        got = [np.frombuffer(r.raw_output_contents[0], "<f4") for r in (response, again)]
        np.testing.assert_allclose(got, want[1:], rtol=1e-4, atol=1e-5)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)  # ended
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- errors as Triton gives them -------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "datatype", "shape", "flags", "code"),
    [
        pytest.param("lstm", "FP32", [1, FEATURES], {"sequence_id": 0}, "INVALID_ARGUMENT", id="no-sequence-id"),
        pytest.param("lstm", "FP32", [1, FEATURES], {"sequence_id": "x-unknown"}, "INVALID_ARGUMENT", id="unknown-sequence"),
        pytest.param("lstm", "FP64", [1, FEATURES], {"sequence_start": True}, "INVALID_ARGUMENT", id="datatype"),
        pytest.param("lstm", "FP32", [1, FEATURES + 1], {"sequence_start": True}, "INVALID_ARGUMENT", id="shape"),
        pytest.param("lstm", "FP32", [FEATURES], {"sequence_start": True}, "INVALID_ARGUMENT", id="no-batch-dim"),
        pytest.param("lstm", "FP32", [2, FEATURES], {"sequence_start": True}, "INVALID_ARGUMENT", id="batch-2"),
        pytest.param("no_such_model", "FP32", [1, FEATURES], {"sequence_start": True}, "NOT_FOUND", id="unknown-model"),
    ],
)  # fmt: skip
def test_unary_errors(
    client: tc.InferenceServerClient,
    model: str,
    datatype: str,
    shape: list[int],
    flags: dict[str, Any],
    code: str,
) -> None:
    dtype = np.float64 if datatype == "FP64" else np.float32
    tensor = tc.InferInput("x", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    kwargs = {"sequence_id": f"err-{uuid.uuid4().hex[:8]}", **flags}
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [tensor], **kwargs)
    assert info.value.status() == f"StatusCode.{code}"
    if kwargs.get("sequence_start"):
        # A START that failed validation started nothing.
        good = x_input(np.zeros(FEATURES))
        with pytest.raises(InferenceServerException) as again:
            client.infer("lstm", [good], sequence_id=kwargs["sequence_id"])
        assert again.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_nonfinite_start_changes_nothing(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    """A START whose step holds NaN is refused before the START takes effect: a new
    sequence is not created, and a live one is not reset to its initial state."""
    xs = expected_outputs["xs"][4]
    want = expected_outputs["lstm"][4]
    bad = np.zeros(FEATURES, dtype=np.float32)
    bad[1] = np.nan
    sequence_id = random.getrandbits(40) + 1
    with pytest.raises(InferenceServerException) as info:
        client.infer("lstm", [x_input(bad)], sequence_id=sequence_id, sequence_start=True)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "NaN" in info.value.message()
    with pytest.raises(InferenceServerException) as again:  # nothing was started
        client.infer("lstm", [x_input(xs[0])], sequence_id=sequence_id)
    assert "START" in again.value.message()

    first = client.infer("lstm", [x_input(xs[0])], sequence_id=sequence_id, sequence_start=True)
    with pytest.raises(InferenceServerException):  # a NaN restart of the live sequence
        client.infer("lstm", [x_input(bad)], sequence_id=sequence_id, sequence_start=True)
    second = client.infer("lstm", [x_input(xs[1])], sequence_id=sequence_id, sequence_end=True)
    got = np.stack([first.as_numpy("y")[0], second.as_numpy("y")[0]])
    np.testing.assert_allclose(got, want[:2], rtol=1e-4, atol=1e-5)


def test_stream_error_answers_its_request_and_stream_goes_on(
    client: tc.InferenceServerClient, expected_outputs: dict[str, Any]
) -> None:
    xs = expected_outputs["xs"][3]
    want = expected_outputs["lstm"][3]
    sequence_id = random.getrandbits(40) + 1
    collector = StreamCollector()
    client.start_stream(callback=collector)
    try:
        # A step of a sequence that was never started: an error for that request.
        client.async_stream_infer(
            "lstm", [x_input(xs[0])], request_id="bad", sequence_id=sequence_id
        )
        error = collector.next()
        assert isinstance(error, InferenceServerException)
        assert "START" in error.message()
        # Bad datatype, unknown model, missing sequence id: each answered, in turn.
        wrong = tc.InferInput("x", [1, FEATURES], "FP64")
        wrong.set_data_from_numpy(np.zeros((1, FEATURES)))
        for kwargs in (
            {"model_name": "lstm", "inputs": [wrong], "sequence_id": sequence_id},
            {"model_name": "no_such_model", "inputs": [x_input(xs[0])], "sequence_id": 5},
            {"model_name": "lstm", "inputs": [x_input(xs[0])]},
        ):
            client.async_stream_infer(**kwargs)
            assert isinstance(collector.next(), InferenceServerException)
        # The same stream still serves the sequence, started properly.
        for t in range(3):
            client.async_stream_infer(
                "lstm",
                [x_input(xs[t])],
                request_id=f"ok-{t}",
                sequence_id=sequence_id,
                sequence_start=t == 0,
                sequence_end=t == 2,
            )
        for _ in range(3):
            assert isinstance(collector.next(), tc.InferResult)
        got = np.stack([collector.results[f"ok-{t}"].as_numpy("y")[0] for t in range(3)])
        np.testing.assert_allclose(got, want[:3], rtol=1e-4, atol=1e-5)
        # After END in the stream, a step without START fails again.
        client.async_stream_infer("lstm", [x_input(xs[3])], sequence_id=sequence_id)
        assert isinstance(collector.next(), InferenceServerException)
    finally:
        client.stop_stream()
    assert len(collector.errors) == 5


def test_stream_error_response_carries_request_id(address: str) -> None:
    """On Triton's wire format an error answer names the request it answers."""
    request = triton_pb2.ModelInferRequest(model_name="lstm", id="req-7")
    request.parameters["sequence_id"].string_param = f"never-started-{uuid.uuid4().hex[:8]}"
    request.inputs.add(name="x", datatype="FP32", shape=[1, FEATURES])
    request.raw_input_contents.append(np.zeros(FEATURES, dtype=np.float32).tobytes())
    with grpc.insecure_channel(address) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        (reply,) = list(stub.ModelStreamInfer(iter([request])))
    assert "START" in reply.error_message
    assert reply.infer_response.id == "req-7"
    assert reply.infer_response.model_name == "lstm"
