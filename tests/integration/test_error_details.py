"""Structured errors on the wire: `rnnserve.v1.ErrorDetail` in every failed call's
trailing metadata (`rnnserve-error-bin`, both services), in a stream's in-band `Error`,
and per failed StepMany row; the SDK's exceptions chosen from it, never from messages."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.client import (
    AsyncClient,
    Client,
    ClientError,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    SeqConflict,
    SessionRolledBack,
    VersionMismatch,
)
from rnnserve.client._exceptions import from_status
from rnnserve.protocol.inference import grpc_service_pb2 as kpb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kgrpc
from tests.integration._grpc_util import native_stub, pb, pb_grpc, rpc_error, running_server, tensor
from tests.models import FEATURES, write_repository
from tests.servers import ServerThread, unique

DETAIL_KEY = "rnnserve-error-bin"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lstm` versions 1 and 2 (the same weights), and `ctx`."""
    root = write_repository(tmp_path_factory.mktemp("versions"))
    shutil.copytree(root / "lstm" / "1", root / "lstm" / "2")
    return root


@pytest.fixture(scope="module")
def server(two_versions: Path) -> Iterator[ServerThread]:
    with running_server(two_versions, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    yield stub
    channel.close()


def detail_of(error: grpc.RpcError) -> pb.ErrorDetail:
    values = [v for k, v in error.trailing_metadata() or () if k == DETAIL_KEY]
    assert len(values) == 1, error.trailing_metadata()
    return pb.ErrorDetail.FromString(values[0])


def x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(FEATURES,)).astype("float32")


def start(stub: pb_grpc.RecurrentStub, version: str = "1") -> str:
    session_id = unique("err")
    stub.StartSession(pb.StartSessionRequest(model="lstm", version=version, session_id=session_id))
    return session_id


def step_request(session_id: str, seq: int | None, request_id: str, version: str = "1"):
    return pb.StepRequest(
        model="lstm",
        session_id=session_id,
        inputs=[tensor("x", x())],
        seq=seq,
        request_id=request_id,
        version=version,
    )


# -- on the wire ------------------------------------------------------------------------
def test_a_seq_conflict_carries_reason_and_both_seqs(stub):
    session_id = start(stub)
    stub.Step(step_request(session_id, 0, "a"))
    stub.Step(step_request(session_id, 1, "b"))
    error = rpc_error(stub.Step, step_request(session_id, 0, "c"))  # a stale step
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    detail = detail_of(error)
    assert detail.reason == "SEQ_CONFLICT"
    assert (detail.current_seq, detail.requested_seq) == (2, 0)


def test_a_step_ahead_of_the_store_is_session_rolled_back(stub):
    """A seq ahead of the stored one means acknowledged steps are missing (a lost
    commit, issue 14): its own reason, with the stored and the requested seq."""
    session_id = start(stub)
    stub.Step(step_request(session_id, 0, "a"))
    error = rpc_error(stub.Step, step_request(session_id, 5, "b"))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    detail = detail_of(error)
    assert detail.reason == "SESSION_ROLLED_BACK"
    assert (detail.current_seq, detail.requested_seq) == (1, 5)


def test_version_mismatch_has_its_own_reason(stub):
    session_id = start(stub, version="1")
    error = rpc_error(stub.Step, step_request(session_id, 0, "a", version="2"))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    detail = detail_of(error)
    assert detail.reason == "VERSION_MISMATCH"
    assert not detail.HasField("current_seq")


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (
            pb.StepRequest(model="lstm", session_id="never-started", inputs=[tensor("x", x())]),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        ),
        (
            pb.StepRequest(model="nope", session_id="s", inputs=[tensor("x", x())]),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            pb.StepRequest(model="lstm", session_id="s", inputs=[tensor("wrong", x())]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
    ],
    ids=["session", "model", "input"],
)
def test_every_failed_unary_call_carries_a_detail(stub, request_, code, reason):
    error = rpc_error(stub.Step, request_)
    assert error.code() is code
    assert detail_of(error).reason == reason


def test_the_kserve_service_shares_the_interceptor(server):
    channel = grpc.insecure_channel(server.address)
    try:
        error = rpc_error(
            kgrpc.GRPCInferenceServiceStub(channel).ModelInfer,
            kpb.ModelInferRequest(model_name="nope"),
        )
    finally:
        channel.close()
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert detail_of(error).reason == "MODEL_NOT_FOUND"


def test_a_stream_error_carries_the_detail_in_band(stub):
    session_id = start(stub)
    replies = list(
        stub.StepStream(iter([step_request(session_id, 0, "a"), step_request(session_id, 0, "b")]))
    )
    assert not replies[0].HasField("error")
    error = replies[1].error
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert error.detail.reason == "SEQ_CONFLICT"
    assert (error.detail.current_seq, error.detail.requested_seq) == (1, 0)


def test_step_many_sends_details_only_when_a_row_failed(stub):
    ids = [start(stub) for _ in range(3)]
    inputs = [tensor("x", np.stack([x(k) for k in range(3)]))]
    ok = stub.StepMany(
        pb.StepManyRequest(model="lstm", version="1", session_ids=ids, inputs=inputs)
    )
    assert list(ok.codes) == [0, 0, 0]
    assert len(ok.details) == 0  # the fast path pays nothing

    mixed = stub.StepMany(
        pb.StepManyRequest(
            model="lstm", version="1", session_ids=ids, inputs=inputs, seqs=[1, 0, -1]
        )
    )
    assert list(mixed.codes) == [0, grpc.StatusCode.FAILED_PRECONDITION.value[0], 0]
    assert [d.reason for d in mixed.details] == ["", "SEQ_CONFLICT", ""]
    assert (mixed.details[1].current_seq, mixed.details[1].requested_seq) == (1, 0)


# -- in the SDK -------------------------------------------------------------------------
def test_the_sdk_maps_reasons_to_exceptions(server):
    with Client(server.address) as client:
        session = client.session("lstm", version="1")
        session.step(x())
        stale = client.attach("lstm", session.session_id)
        session.step(x())
        with pytest.raises(SeqConflict) as conflict:
            stale.step(x())
        assert conflict.value.reason == "SEQ_CONFLICT"
        assert (conflict.value.current_seq, conflict.value.requested_seq) == (2, 1)

        other = client.attach("lstm", session.session_id)
        other.version = "2"
        with pytest.raises(VersionMismatch) as mismatch:
            other.step(x())
        assert isinstance(mismatch.value, PreconditionFailed)
        assert not isinstance(mismatch.value, SeqConflict)
        assert mismatch.value.reason == "VERSION_MISMATCH"

        ahead = client.attach("lstm", session.session_id)
        ahead.seq = 9  # as if steps up to seq 9 had been acknowledged, then lost
        with pytest.raises(SessionRolledBack) as rolled:
            ahead.step(x())
        assert isinstance(rolled.value, PreconditionFailed)
        assert not isinstance(rolled.value, SeqConflict)
        assert (rolled.value.stored_seq, rolled.value.requested_seq) == (2, 9)
        assert (rolled.value.reason, rolled.value.missing) == ("SESSION_ROLLED_BACK", 7)

        with pytest.raises(NotFound) as missing:
            client.attach("lstm", "never-started")
        assert missing.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFound) as no_model:
            client.signature("nope")
        assert no_model.value.reason == "MODEL_NOT_FOUND"

        result = client.step_many("lstm", [session.session_id], x()[None], seqs=[0], version="1")
        (row_error,) = result.errors().values()
        assert isinstance(row_error, SeqConflict)
        assert (row_error.current_seq, row_error.requested_seq) == (2, 0)


async def test_the_async_sdk_maps_reasons_too(server):
    async with AsyncClient(server.address) as client:
        session = await client.session("lstm", version="1")
        await session.step(x())
        session.seq = 0  # a stale handle
        with pytest.raises(SeqConflict) as conflict:
            await session.step(x())
        assert (conflict.value.current_seq, conflict.value.requested_seq) == (1, 0)
        with pytest.raises(NotFound) as missing:
            await client.attach("lstm", "never-started")
        assert missing.value.reason == "SESSION_NOT_FOUND"


def test_no_message_text_is_parsed():
    """A FAILED_PRECONDITION without a detail is a `PreconditionFailed`, whatever its text
    says; the class comes from the reason alone."""
    plain = from_status(grpc.StatusCode.FAILED_PRECONDITION, "session 's' is at seq 4")
    assert type(plain) is PreconditionFailed
    assert plain.current_seq is None and plain.reason == "FAILED_PRECONDITION"
    detailed = from_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        "anything",
        pb.ErrorDetail(reason="SEQ_CONFLICT", current_seq=4, requested_seq=2),
    )
    assert type(detailed) is SeqConflict and detailed.current_seq == 4
    unknown = from_status(grpc.StatusCode.INVALID_ARGUMENT, "x", pb.ErrorDetail(reason="NEW"))
    assert type(unknown) is InvalidRequest and unknown.reason == "NEW"
    assert ClientError("local").reason == "CLIENT"
