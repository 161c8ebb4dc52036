"""`StepMany` / `StepManyStream`: the next step of many sessions in one columnar message,
against a real server with each store; outputs checked row by row against the offline
Keras reference.

Row semantics are Step's: exactly-once with seq + request id, an outcome per row (a bad
row never fails the others), a session's steps applied in order across rows, messages
and the other RPCs; two rows of one session in one message are two consecutive steps.
A message that cannot be read as K rows (wrong shape, ragged columns) is refused whole.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from tests.models import CONTEXT, FEATURES, OUTPUTS
from tests.servers import ServerThread, unique

ATOL = 1e-5
OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]

STORES = [pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]


@pytest.fixture(scope="module", params=STORES)
def server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[ServerThread]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_server(model_repo, redis_url=url, warmup=False) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.RecurrentStub]:
    channel, stub = native_stub(server.address)
    with channel:
        yield stub


def start_sessions(
    stub: pb_grpc.RecurrentStub, n: int, model: str = "lstm", constants: Any = None
) -> list[str]:
    ids = [unique(model) for _ in range(n)]
    for k, session_id in enumerate(ids):
        fields: dict[str, Any] = {}
        if constants is not None:
            fields["constants"] = [tensor("context", constants[k])]
        stub.StartSession(pb.StartSessionRequest(model=model, session_id=session_id, **fields))
    return ids


def many(
    ids: list[str],
    x: np.ndarray,
    *,
    model: str = "lstm",
    seqs: list[int] | None = None,
    request_ids: list[str] | None = None,
    batch_id: str = "",
) -> pb.StepManyRequest:
    return pb.StepManyRequest(
        model=model,
        session_ids=ids,
        inputs=[tensor("x", x)],
        seqs=seqs or [],
        request_ids=request_ids or [],
        batch_id=batch_id,
    )


def outputs(reply: pb.StepManyResponse) -> np.ndarray:
    (y,) = reply.outputs
    assert y.name == "y"
    return decode_tensor(y)


class ManyStream:
    """A StepManyStream held open: `send` a message, `recv` the next reply."""

    def __init__(self, stub: pb_grpc.RecurrentStub, metadata: Any = None) -> None:
        self._requests: queue.Queue[pb.StepManyRequest | None] = queue.Queue()
        self._call = stub.StepManyStream(iter(self._requests.get, None), metadata=metadata)
        self._replies: queue.Queue[Any] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
        except grpc.RpcError as exc:
            self._replies.put(exc)
        self._replies.put(None)

    def send(self, request: pb.StepManyRequest) -> None:
        self._requests.put(request)

    def recv(self) -> pb.StepManyResponse:
        reply = self._replies.get(timeout=60)
        assert isinstance(reply, pb.StepManyResponse), reply
        return reply

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(timeout=60)
        assert self._replies.get(timeout=5) is None  # the stream ended with OK


# -- outputs ---------------------------------------------------------------------------
def test_stream_rows_equal_the_reference(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    n, steps = 7, 5
    inputs = xs(n, steps, seed=11)
    want = cached_reference(model_repo, "lstm", inputs)
    ids = start_sessions(stub, n)
    stream = ManyStream(stub)
    for t in range(steps):
        stream.send(many(ids, inputs[:, t], seqs=[t] * n, batch_id=f"b{t}"))
        reply = stream.recv()
        assert reply.batch_id == f"b{t}"
        assert list(reply.session_ids) == ids
        assert list(reply.codes) == [OK] * n, list(reply.messages)
        assert list(reply.messages) == [""] * n
        assert list(reply.seqs) == [t + 1] * n
        assert list(reply.replayed) == [False] * n
        assert not reply.HasField("error")
        assert list(reply.outputs[0].shape) == [n, OUTPUTS]
        np.testing.assert_allclose(outputs(reply), want[:, t], atol=ATOL)
    stream.close()


def test_unary_rows_with_constants_equal_the_reference(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    n, steps = 4, 3
    inputs = xs(n, steps, seed=12)
    context = np.random.default_rng(3).normal(size=(n, CONTEXT)).astype("float32")
    want = cached_reference(model_repo, "ctx", inputs, context)
    ids = start_sessions(stub, n, model="ctx", constants=context)
    for t in range(steps):
        reply = stub.StepMany(many(ids, inputs[:, t], model="ctx"))
        assert list(reply.codes) == [OK] * n, list(reply.messages)
        assert list(reply.seqs) == [t + 1] * n
        np.testing.assert_allclose(outputs(reply), want[:, t], atol=ATOL)


# -- exactly-once ------------------------------------------------------------------------
def test_a_retried_message_applies_nothing_twice(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    n, steps = 5, 3
    inputs = xs(n, steps, seed=13)
    want = cached_reference(model_repo, "lstm", inputs)
    ids = start_sessions(stub, n)
    for t in range(steps):
        request = many(ids, inputs[:, t], seqs=[t] * n, request_ids=[f"{i}-{t}" for i in range(n)])
        first = stub.StepMany(request)
        again = stub.StepMany(request)  # the client never saw `first`: it retries
        assert list(first.codes) == list(again.codes) == [OK] * n
        assert list(first.replayed) == [False] * n
        assert list(again.replayed) == [True] * n
        assert list(again.seqs) == list(first.seqs) == [t + 1] * n
        np.testing.assert_array_equal(outputs(again), outputs(first))
        np.testing.assert_allclose(outputs(first), want[:, t], atol=ATOL)
    for session_id in ids:  # the sessions advanced once per message, not twice
        info = stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id))
        assert info.seq == steps


# -- one bad row fails alone -----------------------------------------------------------------
def test_bad_rows_fail_alone(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    inputs = xs(3, 2, seed=14)
    want = cached_reference(model_repo, "lstm", inputs)
    good = start_sessions(stub, 3)
    nan_session, conflict_session = start_sessions(stub, 2)
    rows = [good[0], nan_session, "never-started-" + unique("x"), good[1], "", conflict_session]
    rows.append(good[2])
    x = np.zeros((len(rows), FEATURES), "float32")
    x[[0, 3, 6]] = inputs[:, 0]
    x[1, 2] = np.nan
    seqs = [0, 0, -1, -1, -1, 5, -1]  # the conflict row expects seq 5 of a fresh session
    reply = stub.StepMany(many(rows, x, seqs=seqs))
    codes = list(reply.codes)
    assert codes == [OK, INVALID_ARGUMENT, NOT_FOUND, OK, INVALID_ARGUMENT, FAILED_PRECONDITION, OK]
    assert "NaN" in reply.messages[1] and "'x'" in reply.messages[1]
    assert "does not exist" in reply.messages[2]
    assert "session id" in reply.messages[4]
    assert "seq 0" in reply.messages[5] and "expected seq 5" in reply.messages[5]
    got = outputs(reply)
    np.testing.assert_allclose(got[[0, 3, 6]], want[:, 0], atol=ATOL)
    assert not got[[1, 2, 4, 5]].any()  # failed rows hold zeros
    assert [reply.seqs[k] for k in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    for session_id in (nan_session, conflict_session):  # untouched
        assert stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id)).seq == 0
    # the good sessions go on as if nothing happened
    reply = stub.StepMany(many(good, inputs[:, 1], seqs=[1, 1, 1]))
    assert list(reply.codes) == [OK] * 3
    np.testing.assert_allclose(outputs(reply), want[:, 1], atol=ATOL)


def test_unusable_messages_are_refused_whole_and_the_stream_goes_on(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(2, 2, seed=15)
    want = cached_reference(model_repo, "lstm", inputs)
    ids = start_sessions(stub, 2)
    wrong_shape = pb.StepManyRequest(
        model="lstm", session_ids=ids, inputs=[tensor("x", np.zeros((2, FEATURES + 1), "f4"))]
    )
    ragged_rows = many(ids, np.zeros((3, FEATURES), "float32"))
    ragged_seqs = many(ids, inputs[:, 0], seqs=[0])
    ragged_ids = many(ids, inputs[:, 0], request_ids=["a", "b", "c"])
    unknown_model = many(ids, inputs[:, 0], model="nope")
    empty = many([], np.zeros((0, FEATURES), "float32"))
    refused = [wrong_shape, ragged_rows, ragged_seqs, ragged_ids, unknown_model, empty]
    expected = [
        (INVALID_ARGUMENT, "shape (2, 5), expected (2, 4)"),
        (INVALID_ARGUMENT, "input 'x' has 3 rows; the message has 2 session ids"),
        (INVALID_ARGUMENT, "1 seqs for 2 rows"),
        (INVALID_ARGUMENT, "3 request ids for 2 rows"),
        (NOT_FOUND, "model 'nope' is not loaded"),
        (INVALID_ARGUMENT, "at least one row"),
    ]
    stream = ManyStream(stub)
    stream.send(many(ids, inputs[:, 0], seqs=[0, 0], batch_id="first"))
    for k, request in enumerate(refused):
        request.batch_id = f"bad{k}"
        stream.send(request)
    stream.send(many(ids, inputs[:, 1], seqs=[1, 1], batch_id="last"))
    replies = {reply.batch_id: reply for reply in (stream.recv() for _ in range(len(refused) + 2))}
    stream.close()
    for k, (code, text) in enumerate(expected):
        reply = replies[f"bad{k}"]
        assert reply.error.code == code, reply
        assert text in reply.error.message, reply.error.message
        assert not reply.codes and not reply.outputs
    for t, batch_id in enumerate(("first", "last")):
        assert list(replies[batch_id].codes) == [OK, OK]
        np.testing.assert_allclose(outputs(replies[batch_id]), want[:, t], atol=ATOL)
    # unary: the same refusals are the call's status
    for request, (code, text) in zip(refused, expected, strict=True):
        error = rpc_error(stub.StepMany, request)
        assert error.code().value[0] == code
        assert text in (error.details() or "")
    for session_id in ids:
        assert stub.GetSession(pb.SessionRef(model="lstm", session_id=session_id)).seq == 2


# -- order ---------------------------------------------------------------------------------
def test_two_rows_of_one_session_are_consecutive_steps(
    stub: pb_grpc.RecurrentStub, model_repo: Path
) -> None:
    inputs = xs(2, 3, seed=16)
    want = cached_reference(model_repo, "lstm", inputs)
    a, b = start_sessions(stub, 2)
    x = np.stack([inputs[0, 0], inputs[1, 0], inputs[0, 1], inputs[0, 2]])
    reply = stub.StepMany(many([a, b, a, a], x, seqs=[0, -1, 1, 2]))
    assert list(reply.codes) == [OK] * 4, list(reply.messages)
    assert list(reply.seqs) == [1, 1, 2, 3]
    got = outputs(reply)
    np.testing.assert_allclose(got[[0, 2, 3]], want[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want[1, 0], atol=ATOL)
    # the same rows with a wrong seq order: the later row conflicts, the earlier applies
    x = np.stack([inputs[1, 2], inputs[1, 1]])
    reply = stub.StepMany(many([b, b], x, seqs=[2, 1]))
    assert list(reply.codes) == [FAILED_PRECONDITION, OK]
    np.testing.assert_allclose(outputs(reply)[1], want[1, 1], atol=ATOL)


def test_pipelined_messages_apply_in_order(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    n, steps = 3, 8
    inputs = xs(n, steps, seed=17)
    want = cached_reference(model_repo, "lstm", inputs)
    ids = start_sessions(stub, n)
    stream = ManyStream(stub)
    for t in range(steps):  # no seqs, all sent before any reply is read
        stream.send(many(ids, inputs[:, t], batch_id=str(t)))
    replies = sorted((stream.recv() for _ in range(steps)), key=lambda r: int(r.batch_id))
    stream.close()
    for t, reply in enumerate(replies):
        assert list(reply.seqs) == [t + 1] * n
        np.testing.assert_allclose(outputs(reply), want[:, t], atol=ATOL)


def test_mixing_with_step_keeps_order(stub: pb_grpc.RecurrentStub, model_repo: Path) -> None:
    steps = 6
    inputs = xs(2, steps, seed=18)
    want = cached_reference(model_repo, "lstm", inputs)
    a, b = start_sessions(stub, 2)
    stream = ManyStream(stub)
    got = np.zeros((2, steps, OUTPUTS), "float32")
    for t in range(steps):
        if t % 2:
            for i, session_id in enumerate((a, b)):
                reply = stub.Step(
                    pb.StepRequest(
                        model="lstm", session_id=session_id, inputs=[tensor("x", inputs[i, t])],
                        seq=t,
                    )
                )  # fmt: skip
                assert reply.seq == t + 1
                got[i, t] = decode_tensor(reply.outputs[0])
        else:
            stream.send(many([a, b], inputs[:, t], seqs=[t, t]))
            reply = stream.recv()
            assert list(reply.codes) == [OK, OK], list(reply.messages)
            got[:, t] = outputs(reply)
    stream.close()
    np.testing.assert_allclose(got, want, atol=ATOL)
    # a step on a StepStream and rows on a StepManyStream, both without seqs, in flight
    # together: every step applies once, and the session ends at the sum of them
    requests = [
        pb.StepRequest(model="lstm", session_id=a, inputs=[tensor("x", inputs[0, t])])
        for t in range(steps)
    ]
    stream = ManyStream(stub)
    for t in range(steps):
        stream.send(many([a], inputs[:1, t], batch_id=str(t)))
    step_seqs = [r.seq for r in stub.StepStream(iter(requests))]
    many_seqs = [stream.recv().seqs[0] for _ in range(steps)]
    stream.close()
    assert sorted(step_seqs + many_seqs) == list(range(steps + 1, 3 * steps + 1))


# -- namespaces ------------------------------------------------------------------------------
@pytest.mark.parametrize("store", STORES)
def test_a_foreign_namespace_row_fails_alone(
    store: str, request: pytest.FixtureRequest, model_repo: Path
) -> None:
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    alpha = [("authorization", "Bearer token-a")]
    beta = [("authorization", "Bearer token-b")]
    inputs = xs(1, 1, seed=19)
    want = cached_reference(model_repo, "lstm", inputs)
    with running_server(
        model_repo, redis_url=url, warmup=False, auth_tokens="token-a=alpha,token-b=beta"
    ) as server:
        channel, stub = native_stub(server.address)
        with channel:
            for metadata, session_id in ((alpha, "secret"), (beta, "mine")):
                start = pb.StartSessionRequest(model="lstm", session_id=session_id)
                stub.StartSession(start, metadata=metadata)
            ref = pb.SessionRef(model="lstm", session_id="secret")
            before = stub.ExportState(ref, metadata=alpha).record
            x = np.concatenate([inputs[:, 0], inputs[:, 0]])
            reply = stub.StepMany(many(["secret", "mine"], x), metadata=beta)
            assert list(reply.codes) == [NOT_FOUND, OK]
            assert not outputs(reply)[0].any()
            np.testing.assert_allclose(outputs(reply)[1], want[0, 0], atol=ATOL)
            assert stub.ExportState(ref, metadata=alpha).record == before
            error = rpc_error(stub.StepMany, many(["mine"], inputs[:, 0]))  # no token
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
