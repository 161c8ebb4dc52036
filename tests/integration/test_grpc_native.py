"""Every RPC of `rnnserve.v1.Recurrent` against a real server, numbers checked offline.

One server per store (memory, Redis) serves the whole module; each test uses
session ids of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.integration._grpc_util import (
    cached_reference,
    decode_tensor,
    native_stub,
    pb,
    pb_grpc,
    rpc_error,
    running_server,
    tensor,
    xs,
)
from tests.models import CONTEXT, FEATURES, OUTPUTS, UNITS
from tests.servers import ServerThread, unique

ATOL = 1e-5


@pytest.fixture(
    scope="module", params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]
)
def server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[ServerThread]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_server(model_repo, redis_url=url) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    with channel:
        yield stub


def start(stub: pb_grpc.RecurrentStub, model: str = "lstm", **fields: object) -> str:
    session_id = unique(model)
    reply = stub.StartSession(pb.StartSessionRequest(model=model, session_id=session_id, **fields))
    assert reply.session.session_id == session_id
    assert reply.session.seq == 0
    return session_id


def step(
    stub: pb_grpc.RecurrentStub, model: str, session_id: str, x: np.ndarray, **fields: object
) -> pb.StepResponse:
    return stub.Step(
        pb.StepRequest(model=model, session_id=session_id, inputs=[tensor("x", x)], **fields)
    )


def output(reply: pb.StepResponse | pb.RunSequenceResponse) -> np.ndarray:
    (y,) = reply.outputs
    assert y.name == "y"
    return decode_tensor(y)


# -- steps -----------------------------------------------------------------------------
def test_step_with_seq_equals_the_reference(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    inputs = xs(1, 6, seed=1)
    session_id = start(stub)
    outputs = []
    for t in range(6):
        reply = step(stub, "lstm", session_id, inputs[0, t], seq=t, request_id=f"r{t}")
        assert (reply.session_id, reply.seq, reply.request_id) == (session_id, t + 1, f"r{t}")
        assert not reply.replayed and not reply.HasField("error")
        assert reply.outputs[0].dtype == "float32"
        assert list(reply.outputs[0].shape) == [OUTPUTS]
        outputs.append(output(reply))
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    np.testing.assert_allclose(np.stack(outputs), expected, atol=ATOL)


def test_step_without_seq_applies_in_arrival_order(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(1, 4, seed=2)
    session_id = start(stub)
    replies = [step(stub, "lstm", session_id, inputs[0, t]) for t in range(4)]
    assert [r.seq for r in replies] == [1, 2, 3, 4]
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    np.testing.assert_allclose(np.stack([output(r) for r in replies]), expected, atol=ATOL)


def test_exactly_once_retry_is_replayed_without_advancing(stub: pb_grpc.RecurrentStub) -> None:
    inputs = xs(1, 2, seed=3)
    session_id = start(stub)
    first = step(stub, "lstm", session_id, inputs[0, 0], seq=0, request_id="once")
    retry = step(stub, "lstm", session_id, inputs[0, 0], seq=0, request_id="once")
    assert (first.seq, first.replayed) == (1, False)
    assert (retry.seq, retry.replayed, retry.request_id) == (1, True, "once")
    np.testing.assert_array_equal(output(retry), output(first))
    info = stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id))
    assert info.seq == 1
    assert step(stub, "lstm", session_id, inputs[0, 1], seq=1, request_id="twice").seq == 2


def test_step_stream_interleaves_many_sessions(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    sessions, steps = 8, 5
    inputs = xs(sessions, steps, seed=4)
    ids = [start(stub) for _ in range(sessions)]
    requests = [
        pb.StepRequest(
            model="lstm",
            session_id=ids[b],
            inputs=[tensor("x", inputs[b, t])],
            seq=t,
            request_id=f"{b}:{t}",
        )
        for t in range(steps)
        for b in range(sessions)
    ]
    replies = list(stub.StepStream(iter(requests)))
    assert len(replies) == sessions * steps
    by_session: dict[str, list[pb.StepResponse]] = {}
    for reply in replies:
        assert not reply.HasField("error"), reply.error.message
        by_session.setdefault(reply.session_id, []).append(reply)
    expected = cached_reference(model_repo, "lstm", inputs)
    for b, session_id in enumerate(ids):
        got = by_session[session_id]
        # Replies of one session come in order.
        assert [r.seq for r in got] == list(range(1, steps + 1))
        assert [r.request_id for r in got] == [f"{b}:{t}" for t in range(steps)]
        np.testing.assert_allclose(np.stack([output(r) for r in got]), expected[b], atol=ATOL)


# -- sequences ---------------------------------------------------------------------------
def test_run_sequence_and_its_stream_equal_the_reference(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(1, 7, seed=5)
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    whole = start(stub)
    reply = stub.RunSequence(
        pb.RunSequenceRequest(
            model="lstm",
            session_id=whole,
            inputs=[tensor("x", inputs[0])],
            seq=0,
            request_id="run",
        )
    )
    assert (reply.session_id, reply.seq) == (whole, 7)
    assert list(reply.outputs[0].shape) == [7, OUTPUTS]
    np.testing.assert_allclose(output(reply), expected, atol=ATOL)

    streamed = start(stub)
    replies = list(
        stub.RunSequenceStream(
            pb.RunSequenceRequest(
                model="lstm", session_id=streamed, inputs=[tensor("x", inputs[0])], request_id="rs"
            )
        )
    )
    assert [r.seq for r in replies] == list(range(1, 8))
    assert [r.request_id for r in replies] == [f"rs#{t}" for t in range(7)]
    np.testing.assert_allclose(np.stack([output(r) for r in replies]), expected, atol=ATOL)


def test_steps_then_run_sequence_continue_one_state(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(1, 6, seed=6)
    session_id = start(stub)
    head = [output(step(stub, "lstm", session_id, inputs[0, t], seq=t)) for t in range(2)]
    tail = stub.RunSequence(
        pb.RunSequenceRequest(
            model="lstm", session_id=session_id, inputs=[tensor("x", inputs[0, 2:])], seq=2
        )
    )
    assert tail.seq == 6
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    np.testing.assert_allclose(np.concatenate([np.stack(head), output(tail)]), expected, atol=ATOL)


def test_constants_given_at_start_feed_every_step(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(2, 5, seed=7)
    contexts = np.array([[0.5, -1.0], [2.0, 0.25]], "float32")
    expected = cached_reference(model_repo, "ctx", inputs, contexts)
    for b in range(2):
        session_id = start(stub, "ctx", constants=[tensor("context", contexts[b])])
        reply = stub.RunSequence(
            pb.RunSequenceRequest(
                model="ctx", session_id=session_id, inputs=[tensor("x", inputs[b])]
            )
        )
        np.testing.assert_allclose(output(reply), expected[b], atol=ATOL)


# -- lifecycle ---------------------------------------------------------------------------
def test_reset_returns_to_seq_zero_and_initial_state(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(1, 3, seed=8)
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    session_id = start(stub)
    for t in range(3):
        step(stub, "lstm", session_id, inputs[0, t], seq=t)
    info = stub.ResetSession(
        pb.ResetSessionRequest(session=pb.SessionRef(model="lstm", session_id=session_id))
    )
    assert (info.session_id, info.seq, info.model, info.version) == (session_id, 0, "lstm", "1")
    again = [output(step(stub, "lstm", session_id, inputs[0, t], seq=t)) for t in range(3)]
    np.testing.assert_allclose(np.stack(again), expected, atol=ATOL)


def test_reset_with_new_constants(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    inputs = xs(1, 3, seed=9)
    old, new = np.array([1.0, 1.0], "float32"), np.array([-3.0, 0.5], "float32")
    session_id = start(stub, "ctx", constants=[tensor("context", old)])
    step(stub, "ctx", session_id, inputs[0, 0])
    stub.ResetSession(
        pb.ResetSessionRequest(
            session=pb.SessionRef(model="ctx", session_id=session_id),
            constants=[tensor("context", new)],
        )
    )
    reply = stub.RunSequence(
        pb.RunSequenceRequest(model="ctx", session_id=session_id, inputs=[tensor("x", inputs[0])])
    )
    expected = cached_reference(model_repo, "ctx", inputs, new[None])[0]
    np.testing.assert_allclose(output(reply), expected, atol=ATOL)


def test_get_session_reports_seq_model_and_expiry(
    stub: pb_grpc.RecurrentStub, server: ServerThread
) -> None:
    session_id = start(stub)
    for t in range(3):
        step(stub, "lstm", session_id, xs(1, 1, seed=t)[0, 0], seq=t)
    info = stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id))
    assert (info.session_id, info.model, info.version, info.seq) == (session_id, "lstm", "1", 3)
    assert info.created_unix <= info.updated_unix
    idle = server.settings.idle_timeout_s
    assert info.HasField("expires_in_seconds")
    assert 0 < info.expires_in_seconds <= idle


def test_end_session(stub: pb_grpc.RecurrentStub) -> None:
    session_id = start(stub)
    ref = pb.SessionRef(model="lstm", session_id=session_id)
    assert stub.EndSession(ref).existed is True
    assert stub.EndSession(ref).existed is False  # ending twice is not an error
    assert rpc_error(stub.GetSession, ref).code() == grpc.StatusCode.NOT_FOUND


def test_export_import_continues_identically_and_keeps_retry_memory(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(1, 6, seed=10)
    expected = cached_reference(model_repo, "lstm", inputs)[0]
    source = start(stub)
    last = None
    for t in range(3):
        last = step(stub, "lstm", source, inputs[0, t], seq=t, request_id=f"e{t}")
    assert last is not None

    exported = stub.ExportState(pb.SessionRef(model="lstm", session_id=source))
    assert exported.session.seq == 3 and exported.record
    assert [(s.name, list(s.shape)) for s in exported.states] == [
        ("lstm_h", [UNITS]),
        ("lstm_c", [UNITS]),
    ]
    assert list(exported.constants) == []

    target = unique("imported")
    info = stub.ImportState(
        pb.ImportStateRequest(
            session=pb.SessionRef(model="lstm", session_id=target), record=exported.record
        )
    )
    assert (info.session_id, info.seq, info.version) == (target, 3, "1")

    # The retry of the last step before the export is answered from the record.
    retry = step(stub, "lstm", target, inputs[0, 2], seq=2, request_id="e2")
    assert (retry.replayed, retry.seq) == (True, 3)
    np.testing.assert_array_equal(output(retry), output(last))

    # Both the copy and the original continue exactly as one uninterrupted sequence.
    for session_id in (target, source):
        rest = [output(step(stub, "lstm", session_id, inputs[0, t], seq=t)) for t in range(3, 6)]
        np.testing.assert_allclose(np.stack(rest), expected[3:], atol=ATOL)


def test_export_shows_constants(stub: pb_grpc.RecurrentStub) -> None:
    context = np.array([0.25, -0.75], "float32")
    session_id = start(stub, "ctx", constants=[tensor("context", context)])
    exported = stub.ExportState(pb.SessionRef(model="ctx", session_id=session_id))
    (constant,) = exported.constants
    assert constant.name == "context"
    np.testing.assert_array_equal(decode_tensor(constant), context)
    assert [s.name for s in exported.states] == ["h"]


# -- models ------------------------------------------------------------------------------
def test_list_models(stub: pb_grpc.RecurrentStub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, list(m.versions), m.default_version) for m in reply.models] == [
        ("ctx", ["1"], "1"),
        ("lstm", ["1"], "1"),
    ]


def test_get_model_signature(stub: pb_grpc.RecurrentStub, server: ServerThread) -> None:
    def specs(items: object) -> list[tuple[str, str, list[int]]]:
        return [(s.name, s.dtype, list(s.shape)) for s in items]  # type: ignore[attr-defined]

    lstm = stub.GetModelSignature(pb.GetModelSignatureRequest(model="lstm"))
    assert (lstm.model, lstm.version) == ("lstm", "1")
    assert specs(lstm.inputs) == [("x", "float32", [FEATURES])]
    assert specs(lstm.constants) == []
    assert specs(lstm.states) == [("lstm_h", "float32", [UNITS]), ("lstm_c", "float32", [UNITS])]
    assert specs(lstm.outputs) == [("y", "float32", [OUTPUTS])]
    assert lstm.max_batch_size == 64  # config.yaml of the test repository
    assert lstm.idle_timeout_seconds == server.settings.idle_timeout_s
    assert lstm.max_sequence_length == server.settings.max_sequence_length

    ctx = stub.GetModelSignature(pb.GetModelSignatureRequest(model="ctx", version="1"))
    assert specs(ctx.constants) == [("context", "float32", [CONTEXT])]
    assert specs(ctx.states) == [("h", "float32", [UNITS])]
