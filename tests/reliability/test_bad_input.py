"""Bad input, fuzzed with hypothesis against a live server on a private Redis.

Requests with wrong or missing tensor names, dtypes, shapes, byte lengths that do not
match the shape, huge declared shapes, NaN/Inf (policy: reject), huge seq, oversized
messages, unknown models and versions, odd or huge session ids, and raw garbage bytes
on the wire (a generic call, no protobuf on our side). Every answer is OK or a clear
client-error status with a message (never INTERNAL/UNKNOWN); the server stays up; a
bystander session's record is byte-for-byte unchanged; Redis holds only keys of the
form `rnnserve:fuzz:<model>:<session id>` for sessions the fuzzer really started."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.protocol.inference import grpc_service_pb2 as kpb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kgrpc
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import SERVED_DTYPES, encode_tensor
from tests.models import FEATURES
from tests.redis_servers import RedisProcess
from tests.servers import ServerThread

EXAMPLES = int(os.environ.get("RNNSERVE_FUZZ_EXAMPLES", "500"))
MAX_MESSAGE = 64 * 1024
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,  # garbage method names only
}
NAMESPACE = "fuzz"
tally: Counter[str] = Counter()
started: set[tuple[str, str]] = set()


class Live:
    def __init__(self, server: ServerThread, redis: RedisProcess) -> None:
        self.server = server
        self.redis = redis
        self.channel = grpc.insecure_channel(
            server.address,
            options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)],
        )
        self.stub = pb_grpc.RecurrentStub(self.channel)
        self.kserve = kgrpc.GRPCInferenceServiceStub(self.channel)


@pytest.fixture(scope="module")
def live(model_repo, tmp_path_factory) -> Iterator[Live]:
    redis = RedisProcess(tmp_path_factory.mktemp("fuzz-redis"))
    redis.start()
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        redis_url=redis.url, namespace=NAMESPACE, max_message_bytes=MAX_MESSAGE,
    )  # fmt: skip
    try:
        with ServerThread(settings) as server:
            running = Live(server, redis)
            with running.channel:
                yield running
    finally:
        redis.kill()


# -- strategies --------------------------------------------------------------------------
names = st.sampled_from(["x", "y", "context", "h", "", "X", "x ", "x\x00"]) | st.text(max_size=20)
dtypes = st.sampled_from(sorted(SERVED_DTYPES)) | st.sampled_from(
    ["float128", "object", "<f4", ">f4", "str", "complex64", "", "FLOAT32", "V8"]
)
shapes = st.lists(
    st.integers(-3, 8) | st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
    max_size=10,
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    kind = draw(
        st.sampled_from(
            ["random", "near", "right-shape", "valid", "valid", "nonfinite", "short", "oversized"]
        )
    )
    if kind == "valid":
        rows = draw(st.sampled_from([(), (), (1,), (3,)]))  # one step, or a short sequence
        value = draw(st.lists(st.floats(-10, 10, width=32), min_size=4, max_size=4))
        return encode_tensor("x", np.broadcast_to(np.float32(value), (*rows, FEATURES)))
    if kind == "near":  # a plausible tensor with a wrong shape, dtype or length
        return pb.Tensor(
            name="x", dtype=draw(st.sampled_from(["float32", "float64", "int32", "float16"])),
            shape=draw(shapes), data=draw(st.binary(max_size=40)),
        )  # fmt: skip
    if kind == "random":
        return pb.Tensor(
            name=draw(names), dtype=draw(dtypes), shape=draw(shapes),
            data=draw(st.binary(max_size=96)),
        )  # fmt: skip
    if kind == "right-shape":
        values = draw(st.lists(floats, min_size=FEATURES, max_size=FEATURES))
        return encode_tensor(draw(st.sampled_from(["x", "context"])), np.float32(values))
    if kind == "nonfinite":
        value = np.zeros(FEATURES, "float32")
        value[draw(st.integers(0, FEATURES - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return encode_tensor("x", value)
    if kind == "short":
        tensor = encode_tensor("x", np.zeros(FEATURES, "float32"))
        return pb.Tensor(name="x", dtype="float32", shape=[FEATURES], data=tensor.data[:-1])
    return encode_tensor("x", np.zeros(MAX_MESSAGE // 4 + 16, "float32"))  # over the limit


POOL = ["f0", "f1", "f2", "f3"]  # started before fuzzing: steps reach their state
session_ids = (
    st.sampled_from(POOL)
    | st.text(max_size=40)
    | st.sampled_from(
        [
            "", "a:b", "*", "rnnserve:other:lstm:victim", "\r\nFLUSHALL\r\n", "{tag}", "..",
            "a" * 256, "a" * 257, "é" * 200, "\x00", "victim*", "?",
        ]
    )
    | st.integers(300, 20_000).map(lambda n: "s" * n)
)  # fmt: skip
models = st.sampled_from(["lstm"] * 6 + ["ctx"] * 2) | st.sampled_from(
    ["nope", "", "../lstm", "lstm:1", "LSTM", "*"]
)
versions = st.sampled_from([""] * 4 + ["1"] * 2) | st.sampled_from(["2", "0", "-1", "1 ", "x"])
seqs = st.none() | st.integers(0, 2**64 - 1)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, object]:
    method = draw(
        st.sampled_from(
            ["Step", "StartSession", "RunSequence", "GetSession", "ExportState", "ImportState",
             "ResetSession", "GetModelSignature", "ModelInfer", "garbage"]
        )
    )  # fmt: skip
    model, version, session = draw(models), draw(versions), draw(session_ids)
    inputs = draw(st.lists(tensors(), min_size=1, max_size=1) | st.lists(tensors(), max_size=3))
    if method == "Step":
        seq = draw(seqs)
        request = pb.StepRequest(
            model=model, version=version, session_id=session, inputs=inputs,
            request_id=draw(st.text(max_size=300)),
        )  # fmt: skip
        if seq is not None:
            request.seq = seq
        return method, request
    if method == "StartSession":
        return method, pb.StartSessionRequest(
            model=model, version=version, session_id=session, constants=inputs,
            initial_states=draw(st.lists(tensors(), max_size=2)),
        )  # fmt: skip
    if method == "RunSequence":
        return method, pb.RunSequenceRequest(
            model=model, version=version, session_id=session, inputs=inputs
        )
    if method in ("GetSession", "ExportState"):
        return method, pb.SessionRef(model=model, session_id=session)
    if method == "ResetSession":
        return method, pb.ResetSessionRequest(
            session=pb.SessionRef(model=model, session_id=session), constants=inputs
        )
    if method == "ImportState":
        return method, pb.ImportStateRequest(
            session=pb.SessionRef(model=model, session_id=session),
            record=draw(st.binary(max_size=300)),
        )
    if method == "GetModelSignature":
        return method, pb.GetModelSignatureRequest(model=model, version=version)
    if method == "ModelInfer":
        request = kpb.ModelInferRequest(model_name=model, model_version=version)
        if draw(st.booleans()):
            request.parameters["sequence_id"].string_param = session
        else:
            request.parameters["sequence_id"].uint64_param = draw(st.integers(0, 2**64 - 1))
        request.parameters["sequence_start"].bool_param = draw(st.booleans())
        for tensor in inputs:
            entry = request.inputs.add(name=tensor.name, datatype="FP32", shape=tensor.shape)
            entry.contents.fp32_contents.extend(draw(st.lists(floats, max_size=6)))
        return method, request
    target = draw(
        st.sampled_from(
            ["/rnnserve.v1.Recurrent/Step", "/rnnserve.v1.Recurrent/StartSession",
             "/rnnserve.v1.Recurrent/ImportState", "/inference.GRPCInferenceService/ModelInfer",
             "/rnnserve.v1.Recurrent/NoSuchMethod"]
        )
    )  # fmt: skip
    return method, (target, draw(st.binary(max_size=200)))


def _send(live: Live, method: str, request: object) -> object:
    if method == "garbage":
        target, data = request  # type: ignore[misc]
        return live.channel.unary_unary(target)(data, timeout=30)
    if method == "ModelInfer":
        return live.kserve.ModelInfer(request, timeout=30)
    return getattr(live.stub, method)(request, timeout=30)


def _bystander(live: Live) -> tuple[str, bytes, int]:
    session = "bystander"
    live.stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session))
    for t in range(3):
        live.stub.Step(
            pb.StepRequest(
                model="lstm", session_id=session, seq=t,
                inputs=[encode_tensor("x", np.full(FEATURES, t, "float32"))],
            )
        )  # fmt: skip
    exported = live.stub.ExportState(pb.SessionRef(model="lstm", session_id=session))
    return session, exported.record, exported.session.seq


def test_fuzzed_requests_get_clear_statuses(live: Live) -> None:
    bystander, record, seq = _bystander(live)
    for session in POOL:
        live.stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session))
    canary = live.redis.client()
    canary.set("canary", b"still here")

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(calls())
    def one(call: tuple[str, object]) -> None:
        method, request = call
        try:
            reply = _send(live, method, request)
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in CLIENT_ERRORS, (method, code, exc.details())
            assert exc.details(), (method, code)
            assert "Traceback" not in exc.details()
            tally[f"{method} {code.name}"] += 1
            return
        tally[f"{method} OK"] += 1
        if method == "StartSession":
            started.add((request.model, reply.session.session_id))  # type: ignore[attr-defined]
        if method == "ImportState":
            started.add((request.session.model, request.session.session_id))  # type: ignore[attr-defined]
        if method == "ModelInfer":
            param = request.parameters["sequence_id"]  # type: ignore[attr-defined]
            kind = param.WhichOneof("parameter_choice")
            prefix = "s" if kind == "string_param" else "u"
            started.add((request.model_name, f"{prefix}{getattr(param, kind)}"))  # type: ignore[attr-defined]

    one()

    # The server is up and serving; the bystander is untouched.
    with grpc.insecure_channel(live.server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = live.stub.ExportState(pb.SessionRef(model="lstm", session_id=bystander))
    assert after.session.seq == seq and after.record == record
    # No key injection: only the canary and records of sessions started above.
    keys = {key.decode("utf-8", "surrogateescape") for key in canary.scan_iter(count=1000)}
    assert "canary" in keys and canary.get("canary") == b"still here"
    allowed = {f"rnnserve:{NAMESPACE}:lstm:{s}" for s in [bystander, *POOL]}
    allowed |= {f"rnnserve:{NAMESPACE}:{m}:{s}" for m, s in started}
    assert keys - {"canary"} <= allowed, sorted(keys - allowed)[:5]
    canary.close()
    total = sum(tally.values())
    ok = sum(n for name, n in tally.items() if name.endswith(" OK"))
    print(
        f"fuzz: {total} requests, {ok} OK, {total - ok} client errors: {dict(sorted(tally.items()))}"
    )
    assert total == EXAMPLES or total >= EXAMPLES * 0.9
