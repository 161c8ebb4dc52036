"""Every documented status code of the native API, one test each, with its message.

docs/protocol.md's error table lists what these tests assert. Servers are shared per
module: `server` (memory and Redis), `limits` (tiny message, queue and sequence
limits), `dead_store` (Redis URL with nothing listening), `auth` (two tokens).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.service.settings import Settings
from tests.integration._grpc_util import (
    native_stub,
    pb,
    pb_grpc,
    rpc_error,
    running_server,
    tensor,
    xs,
)
from tests.models import FEATURES
from tests.redis_servers import RedisProcess
from tests.servers import ServerThread, unique

X = xs(1, 1, seed=0)[0, 0]
TOKENS = "token-a=alpha,token-b=beta"


@pytest.fixture(scope="module")
def lstm_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with only `lstm`, for the servers that need one small model."""
    root = tmp_path_factory.mktemp("lstm-only")
    shutil.copytree(model_repo / "lstm", root / "lstm")
    return root


@pytest.fixture(
    scope="module", params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]
)
def server(request: pytest.FixtureRequest, lstm_repo: Path) -> Iterator[ServerThread]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_server(lstm_repo, redis_url=url, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    with channel:
        yield stub


def start(stub: pb_grpc.RecurrentStub, **kwargs: object) -> str:
    session_id = unique("err")
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id), **kwargs)
    return session_id


def step_request(session_id: str, *inputs: pb.Tensor, **fields: object) -> pb.StepRequest:
    return pb.StepRequest(
        model="lstm", session_id=session_id, inputs=list(inputs) or [tensor("x", X)], **fields
    )


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


# -- INVALID_ARGUMENT --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        pytest.param(
            pb.Tensor(name="x", dtype="complex64", shape=[FEATURES], data=bytes(32)),
            ["input 'x'", "dtype 'complex64' is not one of"],
            id="dtype",
        ),
        pytest.param(
            pb.Tensor(name="x", dtype="float32", shape=[FEATURES], data=bytes(12)),
            ["input 'x'", "needs 16 bytes of data, got 12"],
            id="byte-length",
        ),
        pytest.param(
            tensor("z", X),
            ["unknown input tensor(s) ['z']", "expected ['x']"],
            id="unknown-name",
        ),
        pytest.param(
            tensor("x", np.zeros(FEATURES + 1, "float32")),
            ["input 'x'", "shape (5,), expected (4,)"],
            id="shape",
        ),
        pytest.param(
            tensor("x", np.zeros(FEATURES, "complex64")),
            ["input 'x'", "dtype 'complex64'"],
            id="unserved-dtype-from-numpy",
        ),
    ],
)
def test_invalid_argument_names_the_tensor(
    stub: pb_grpc.RecurrentStub, bad: pb.Tensor, fragments: list[str]
) -> None:
    session_id = start(stub)
    error = rpc_error(stub.Step, step_request(session_id, bad))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    # Nothing was applied.
    assert stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id)).seq == 0


def test_invalid_argument_for_a_missing_session_id(stub: pb_grpc.RecurrentStub) -> None:
    error = rpc_error(stub.Step, step_request(""))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")


def test_invalid_argument_for_a_record_that_is_not_one(stub: pb_grpc.RecurrentStub) -> None:
    request = pb.ImportStateRequest(
        session=pb.SessionRef(model="lstm", session_id=unique()), record=b"not a record"
    )
    error = rpc_error(stub.ImportState, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "record")


# -- NOT_FOUND ---------------------------------------------------------------------------
def test_not_found_for_an_unknown_session(stub: pb_grpc.RecurrentStub) -> None:
    error = rpc_error(stub.Step, step_request("never-started"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "session 'never-started'", "does not exist")
    error = rpc_error(stub.GetSession, pb.SessionRef(model="lstm", session_id="never-started"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "session 'never-started'")


def test_not_found_for_an_unknown_model(stub: pb_grpc.RecurrentStub) -> None:
    error = rpc_error(stub.StartSession, pb.StartSessionRequest(model="nope", session_id="s"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded")
    error = rpc_error(stub.GetModelSignature, pb.GetModelSignatureRequest(model="nope"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "model 'nope'")


def test_not_found_for_an_unknown_version(stub: pb_grpc.RecurrentStub) -> None:
    request = pb.StartSessionRequest(model="lstm", version="7", session_id="s")
    error = rpc_error(stub.StartSession, request)
    assert_status(error, grpc.StatusCode.NOT_FOUND, "model 'lstm' has no version '7'", "['1']")


# -- FAILED_PRECONDITION -----------------------------------------------------------------
def test_failed_precondition_names_the_current_seq(stub: pb_grpc.RecurrentStub) -> None:
    session_id = start(stub)
    stub.Step(step_request(session_id, seq=0, request_id="a"))
    stub.Step(step_request(session_id, seq=1, request_id="b"))
    error = rpc_error(stub.Step, step_request(session_id, seq=5, request_id="c"))
    # A seq ahead of the store's: steps the client was acknowledged are missing.
    assert_status(
        error,
        grpc.StatusCode.FAILED_PRECONDITION,
        "is at seq 2 but this step expected seq 5",
        "steps 3 to 5 are missing from the state store",
    )
    # A stale seq with a new request id is not a retry either.
    error = rpc_error(stub.Step, step_request(session_id, seq=1, request_id="d"))
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "is at seq 2")
    assert stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id)).seq == 2


def test_failed_run_sequence_says_how_many_steps_applied(stub: pb_grpc.RecurrentStub) -> None:
    session_id = start(stub)
    stub.Step(step_request(session_id))
    request = pb.RunSequenceRequest(
        model="lstm", session_id=session_id, inputs=[tensor("x", xs(1, 3)[0])], seq=0
    )
    error = rpc_error(stub.RunSequence, request)
    assert_status(
        error, grpc.StatusCode.FAILED_PRECONDITION, "is at seq 1", "0 of 3 step(s) applied"
    )


# -- exactly-once --------------------------------------------------------------------------
def test_retry_is_replayed_not_applied_twice(stub: pb_grpc.RecurrentStub) -> None:
    session_id = start(stub)
    first = stub.Step(step_request(session_id, seq=0, request_id="r0"))
    again = stub.Step(step_request(session_id, seq=0, request_id="r0"))
    assert (first.replayed, again.replayed, again.seq) == (False, True, 1)
    assert again.outputs == first.outputs
    assert stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id)).seq == 1


# -- StepStream: errors per message ------------------------------------------------------
def test_step_stream_answers_a_bad_message_and_continues(stub: pb_grpc.RecurrentStub) -> None:
    session_id = start(stub)
    bad = pb.Tensor(name="x", dtype="float32", shape=[FEATURES], data=b"\0")
    requests = [
        step_request(session_id, seq=0, request_id="ok-0"),
        step_request(session_id, bad, request_id="bad-bytes"),
        step_request("nobody", request_id="no-session"),
        step_request(session_id, seq=7, request_id="bad-seq"),
        step_request(session_id, seq=1, request_id="ok-1"),
    ]
    replies = {r.request_id: r for r in stub.StepStream(iter(requests))}
    assert set(replies) == {r.request_id for r in requests}
    assert replies["ok-0"].seq == 1 and not replies["ok-0"].HasField("error")
    assert replies["ok-1"].seq == 2 and not replies["ok-1"].HasField("error")
    expected = {
        "bad-bytes": (grpc.StatusCode.INVALID_ARGUMENT, "needs 16 bytes of data, got 1"),
        "no-session": (grpc.StatusCode.NOT_FOUND, "session 'nobody'"),
        "bad-seq": (grpc.StatusCode.FAILED_PRECONDITION, "is at seq 1"),
    }
    for request_id, (code, fragment) in expected.items():
        reply = replies[request_id]
        assert reply.error.code == code.value[0], reply.error
        assert fragment in reply.error.message
        assert not reply.outputs


# -- RESOURCE_EXHAUSTED and limits ---------------------------------------------------------
@pytest.fixture(scope="module")
def limits(lstm_repo: Path) -> Iterator[pb_grpc.RecurrentStub]:
    with running_server(
        lstm_repo,
        warmup=False,
        max_message_bytes=1024,
        max_queue_size=1,
        max_sequence_length=4,
    ) as running:
        channel, stub = native_stub(running.address)
        with channel:
            yield stub


def test_resource_exhausted_for_a_message_over_max_message_bytes(
    limits: pb_grpc.RecurrentStub,
) -> None:
    big = pb.Tensor(name="x", dtype="float32", shape=[400], data=bytes(1600))
    error = rpc_error(limits.Step, step_request("any", big))
    assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


def test_resource_exhausted_when_the_queue_is_full(limits: pb_grpc.RecurrentStub) -> None:
    # RunSequence queues its next step while the current one waits: two queued steps
    # exceed max_queue_size=1 before any batch runs.
    session_id = start(limits)
    request = pb.RunSequenceRequest(
        model="lstm", session_id=session_id, inputs=[tensor("x", xs(1, 2)[0])]
    )
    error = rpc_error(limits.RunSequence, request)
    assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "requests queued (max_queue_size 1)")
    # A single step still fits.
    assert limits.Step(step_request(session_id)).seq == 1


def test_invalid_argument_for_a_sequence_over_max_sequence_length(
    limits: pb_grpc.RecurrentStub,
) -> None:
    request = pb.RunSequenceRequest(
        model="lstm", session_id=start(limits), inputs=[tensor("x", xs(1, 5)[0])]
    )
    error = rpc_error(limits.RunSequence, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "a sequence needs 1 to 4 steps, got 5")


# -- UNAVAILABLE -------------------------------------------------------------------------
def test_unavailable_when_the_store_is_down(lstm_repo: Path, tmp_path: Path) -> None:
    # The store answers at start (a store that does not is waited for: test_health.py),
    # then goes away.
    redis_server = RedisProcess(tmp_path, aof=True)
    redis_server.start()
    settings = Settings(
        model_repository=lstm_repo, port=0, host="127.0.0.1", warmup=False,
        redis_url=redis_server.url,
    )  # fmt: skip
    with ServerThread(settings) as running:
        redis_server.kill()
        channel, stub = native_stub(running.address)
        with channel:
            error = rpc_error(
                stub.StartSession, pb.StartSessionRequest(model="lstm", session_id="s")
            )
            assert_status(error, grpc.StatusCode.UNAVAILABLE, "redis SET failed")
            error = rpc_error(stub.Step, step_request("s"))
            assert_status(error, grpc.StatusCode.UNAVAILABLE, "redis")
            # Metadata does not need the store.
            assert stub.ListModels(pb.ListModelsRequest()).models[0].name == "lstm"


# -- UNAUTHENTICATED and namespaces ------------------------------------------------------
@pytest.fixture(scope="module")
def auth(lstm_repo: Path) -> Iterator[tuple[ServerThread, pb_grpc.RecurrentStub]]:
    with running_server(lstm_repo, warmup=False, auth_tokens=TOKENS) as running:
        channel, stub = native_stub(running.address)
        with channel:
            yield running, stub


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        pytest.param(None, "missing `authorization: Bearer <token>`", id="no-token"),
        pytest.param(bearer("wrong"), "unknown token", id="bad-token"),
        pytest.param([("authorization", "Basic token-a")], "missing", id="not-bearer"),
    ],
)
def test_unauthenticated_without_a_valid_token(
    auth: tuple[ServerThread, pb_grpc.RecurrentStub],
    metadata: list[tuple[str, str]] | None,
    fragment: str,
) -> None:
    _, stub = auth
    error = rpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=metadata)
    assert_status(error, grpc.StatusCode.UNAUTHENTICATED, fragment)
    error = rpc_error(stub.StepStream, iter([step_request("s")]), metadata=metadata)  # streams too
    assert_status(error, grpc.StatusCode.UNAUTHENTICATED, fragment)


def test_health_answers_without_a_token(auth: tuple[ServerThread, pb_grpc.RecurrentStub]) -> None:
    running, stub = auth
    assert stub.ListModels(pb.ListModelsRequest(), metadata=bearer("token-a")).models
    with grpc.insecure_channel(running.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_another_namespace_cannot_see_or_step_a_session(
    auth: tuple[ServerThread, pb_grpc.RecurrentStub],
) -> None:
    _, stub = auth
    a, b = bearer("token-a"), bearer("token-b")
    session_id = unique("private")
    ref = pb.SessionRef(model="lstm", session_id=session_id)
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id), metadata=a)
    stub.Step(step_request(session_id, seq=0), metadata=a)

    for call, request in [
        (stub.GetSession, ref),
        (stub.Step, step_request(session_id)),
        (stub.ExportState, ref),
        (stub.ResetSession, pb.ResetSessionRequest(session=ref)),
    ]:
        error = rpc_error(call, request, metadata=b)
        assert_status(error, grpc.StatusCode.NOT_FOUND, f"session {session_id!r}")
    assert stub.EndSession(ref, metadata=b).existed is False

    # B's session of the same id is B's own; A's is untouched.
    stub.StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id), metadata=b)
    assert stub.GetSession(ref, metadata=b).seq == 0
    assert stub.GetSession(ref, metadata=a).seq == 1


def test_status_messages_carry_no_traceback(stub: pb_grpc.RecurrentStub) -> None:
    error = rpc_error(stub.Step, step_request("never-started"))
    assert not re.search(r"Traceback|File \"", error.details())
