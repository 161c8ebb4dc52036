"""The SDK's core without I/O (client/_core.py), driven by hand: no channel, no server.

The transports (`_sync.py`, `_async.py`) only send what the core builds and hand back
what arrives; here the replies and failures are made up, so every branch of the
exactly-once resume is reached on purpose.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.client import (
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    RetryPolicy,
    SeqConflict,
    SessionRolledBack,
    StepsLost,
)
from rnnserve.client._core import ClientCore, SequenceRun, SessionCore
from rnnserve.client._models import SessionInfo, Signature, TensorSpec, encode_tensor
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb

SIGNATURE = Signature(
    model="m",
    version="1",
    inputs=(TensorSpec("x", "float32", (2,)),),
    constants=(),
    states=(TensorSpec("h", "float32", (3,)),),
    outputs=(TensorSpec("y", "float32", (1,)),),
    max_batch_size=8,
    idle_timeout_s=60.0,
    max_sequence_length=0,
)


class Status(grpc.RpcError):
    """A failed call's status as a transport sees it (code, details, trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, details: str = "", detail: bytes = b"") -> None:
        super().__init__(details)
        self._code, self._details = code, details
        self._trailing = (("rnnserve-error-bin", detail),) if detail else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


UNAVAILABLE = Status(grpc.StatusCode.UNAVAILABLE, "connection refused")


def session(seq: int = 0) -> SessionCore:
    info = SessionInfo("s", "m", "1", seq, 0.0, 0.0, None)
    return SessionCore(SIGNATURE, info)


def reply(seq: int, value: float) -> pb.RunSequenceResponse:
    return pb.RunSequenceResponse(
        session_id="s", seq=seq, outputs=[encode_tensor("y", np.array([value], "float32"))]
    )


def step_reply(seq: int, value: float, replayed: bool = True) -> pb.StepResponse:
    return pb.StepResponse(
        session_id="s",
        seq=seq,
        replayed=replayed,
        outputs=[encode_tensor("y", np.array([value], "float32"))],
    )


def info(seq: int) -> SessionInfo:
    return SessionInfo("s", "m", "1", seq, 0.0, 0.0, None)


XS = np.arange(10, dtype="float32").reshape(5, 2)


# -- SequenceRun ------------------------------------------------------------------------
def test_a_run_without_failures_is_one_call_from_the_handles_seq() -> None:
    handle = session(seq=3)
    run = handle.sequence(XS, attempts=3)
    request = run.next_call()
    assert request is not None
    assert (request.seq, request.request_id.endswith("@0")) == (3, True)
    assert list(request.inputs[0].shape) == [5, 2]
    assert handle.seq_unknown  # while the sequence is under way
    for t in range(5):
        assert run.reply(reply(4 + t, t))["y"].tolist() == [t]
    assert run.done and handle.seq == 8
    assert run.next_call() is None
    assert not handle.seq_unknown


def test_a_break_between_replies_resumes_after_the_last_acknowledged_step() -> None:
    handle = session()
    run = handle.sequence(XS, attempts=3)
    first = run.next_call()
    run.reply(reply(1, 0.0))
    run.reply(reply(2, 1.0))
    assert run.failed(UNAVAILABLE) == 0  # retry number 0's backoff
    assert run.resync(info(2)) is None  # the server is where the client is: go on
    again = run.next_call()
    assert again is not None and first is not None
    assert again.seq == 2 and list(again.inputs[0].shape) == [3, 2]
    assert again.request_id == first.request_id.replace("@0", "@2")
    np.testing.assert_array_equal(
        np.frombuffer(again.inputs[0].data, "float32").reshape(3, 2), XS[2:]
    )


def test_one_lost_reply_is_fetched_again_as_a_replay() -> None:
    handle = session()
    run = handle.sequence(XS, attempts=3)
    run.next_call()
    run.reply(reply(1, 0.0))
    run.failed(UNAVAILABLE)
    replay = run.resync(info(2))  # step 1 was applied, its reply lost
    assert replay is not None
    assert (replay.seq, replay.request_id) == (1, f"{run.request_id}@0#1")
    np.testing.assert_array_equal(np.frombuffer(replay.inputs[0].data, "float32"), XS[1])
    assert run.replayed(step_reply(2, 1.0))["y"].tolist() == [1.0]
    assert run.acked == 2 and handle.seq == 2
    resumed = run.next_call()
    assert resumed is not None and resumed.seq == 2


def test_more_than_one_lost_reply_is_steps_lost() -> None:
    run = session(seq=10).sequence(XS, attempts=3)
    run.next_call()
    run.reply(reply(11, 0.0))
    run.failed(UNAVAILABLE)
    with pytest.raises(StepsLost) as lost:
        run.resync(info(14))
    assert (lost.value.acknowledged, lost.value.current_seq) == (1, 14)


def test_a_session_behind_what_was_acknowledged_is_rolled_back() -> None:
    """The store lost steps it had acknowledged (a failover to a lagging replica):
    resuming from its seq would skip them silently, so the run gives up."""
    run = session(seq=10).sequence(XS, attempts=3)
    run.next_call()
    run.reply(reply(11, 0.0))
    run.reply(reply(12, 1.0))
    run.failed(UNAVAILABLE)
    with pytest.raises(SessionRolledBack) as rolled:
        run.resync(info(11))
    assert (rolled.value.stored_seq, rolled.value.requested_seq, rolled.value.missing) == (
        11,
        12,
        1,
    )


def test_failures_are_retried_until_the_attempts_are_spent_then_raised() -> None:
    run = session().sequence(XS, attempts=3)
    run.next_call()
    assert [run.failed(UNAVAILABLE), run.failed(UNAVAILABLE)] == [0, 1]
    with pytest.raises(ConnectionFailed):
        run.failed(UNAVAILABLE)


def test_a_reply_resets_the_failure_count() -> None:
    run = session().sequence(XS, attempts=2)
    run.next_call()
    run.failed(UNAVAILABLE)
    run.resync(info(0))
    run.next_call()
    run.reply(reply(1, 0.0))
    assert run.failed(UNAVAILABLE) == 0  # not spent: a reply came in between


def test_a_status_that_is_not_retryable_is_raised_at_once() -> None:
    detail = pb.ErrorDetail(reason="SEQ_CONFLICT", current_seq=7, requested_seq=0)
    run = session().sequence(XS, attempts=5)
    run.next_call()
    with pytest.raises(SeqConflict) as conflict:
        run.failed(Status(grpc.StatusCode.FAILED_PRECONDITION, "no", detail.SerializeToString()))
    assert conflict.value.current_seq == 7


def test_an_empty_sequence_is_refused_before_any_call() -> None:
    with pytest.raises(InvalidRequest, match="empty sequence"):
        SequenceRun(session(), np.zeros((0, 2), "float32"), attempts=3)


def test_a_sequence_by_input_name() -> None:
    run = session().sequence({"x": XS}, attempts=1)
    request = run.next_call()
    assert request is not None and request.inputs[0].name == "x"


# -- SessionCore ------------------------------------------------------------------------
def test_each_step_has_a_new_request_id_and_the_handles_seq() -> None:
    handle = session(seq=4)
    a, b = handle.step_request(XS[0]), handle.step_request(XS[1])
    assert (a.seq, b.seq) == (4, 4) and a.request_id != b.request_id
    assert handle.step_done(step_reply(5, 1.0, replayed=False))["y"].tolist() == [1.0]
    assert (handle.seq, handle.last_replayed) == (5, False)
    assert handle.step_request(XS[0]).seq == 5


def test_synced_moves_the_handle_to_the_servers_seq() -> None:
    handle = session()
    handle.seq_unknown = True
    handle.synced(info(9))
    assert (handle.seq, handle.seq_unknown) == (9, False)


# -- ClientCore -------------------------------------------------------------------------
def test_unary_attempts_fail_over_and_back_off_then_raise() -> None:
    core = ClientCore("a:1,b:2", retry=RetryPolicy(attempts=3, initial_backoff_s=0.1))
    attempts = core.unary_attempts()
    assert 0.05 <= attempts.failed(UNAVAILABLE, core.current) <= 0.1
    assert core.address == "b:2"
    assert 0.1 <= attempts.failed(UNAVAILABLE, core.current) <= 0.2
    assert core.address == "a:1"
    with pytest.raises(ConnectionFailed):
        attempts.failed(UNAVAILABLE, core.current)


def test_calls_that_failed_together_move_on_once() -> None:
    core = ClientCore(["a:1", "b:2", "c:3"])
    used = core.current
    core.unary_attempts().failed(UNAVAILABLE, used)
    core.unary_attempts().failed(UNAVAILABLE, used)  # a second call that failed on a:1
    assert core.address == "b:2"


def test_not_found_is_not_retried() -> None:
    core = ClientCore("a:1")
    detail = pb.ErrorDetail(reason="SESSION_NOT_FOUND").SerializeToString()
    with pytest.raises(NotFound) as missing:
        core.unary_attempts().failed(Status(grpc.StatusCode.NOT_FOUND, "gone", detail), 0)
    assert missing.value.reason == "SESSION_NOT_FOUND"


def message(version: str) -> pb.ModelSignature:
    return pb.ModelSignature(model="m", version=version)


def test_only_named_versions_are_cached() -> None:
    """A long-lived client must follow the server's default version: the default is
    asked again for every new session, a named version is fetched once."""
    core = ClientCore("a:1")
    assert core.cached_signature("m", None) is None
    core.remember_signature(message("1"), asked=None)
    assert core.cached_signature("m", None) is None  # a new session asks again
    assert core.cached_signature("m", "1") is not None  # attach to a version-1 session
    assert core.cached_signature("m", None, default_cached=True).version == "1"  # type: ignore[union-attr]
    core.remember_signature(message("2"), asked=None)  # the default moved on
    assert core.cached_signature("m", None, default_cached=True).version == "2"  # type: ignore[union-attr]
    core.remember_signature(message("3"), asked="3")  # a named lookup: not the default
    assert core.cached_signature("m", None, default_cached=True).version == "2"  # type: ignore[union-attr]


def test_a_start_request_chooses_its_id() -> None:
    request = ClientCore.start_request(SIGNATURE, None, {"initial_states": {"h": np.zeros(3)}})
    assert len(request.session_id) == 32 and request.version == "1"
    assert [t.name for t in request.initial_states] == ["h"]
