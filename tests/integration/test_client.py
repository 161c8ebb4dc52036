"""rnnserve.client against real servers (memory and Redis stores): outputs, lifecycle,
errors, exactly-once retries and resumed sequences.

Faults are injected with grpc client interceptors that lose a reply *after* the
server handled the request (or fail a call before it leaves), so the server under
test is always the real one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    RetryPolicy,
    SeqConflict,
    SessionRolledBack,
    StepsLost,
    Unauthorized,
)
from tests.models import CONTEXT, FEATURES, OUTPUTS, reference
from tests.ports import free_port
from tests.servers import ServerThread

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(
    scope="module", params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]
)
def native_server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[ServerThread]:
    """One real server per store for the whole module (starting one costs seconds)."""
    from rnnserve.service.settings import Settings

    options: dict[str, Any] = {
        "model_repository": model_repo,
        "port": 0,
        "host": "127.0.0.1",
        "warmup": False,
    }
    if request.param == "redis":
        options["redis_url"] = request.getfixturevalue("redis_url")
        options["namespace"] = f"test-client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with ServerThread(Settings(**options)) as running:
        yield running


def _sequence(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, FEATURES)).astype("float32")


def _free_address() -> str:
    """An address nothing listens on (a replica that is down)."""
    return f"127.0.0.1:{free_port()}"


# -- outputs -------------------------------------------------------------------------
def test_sync_step_run_stream_equal_the_reference(native_server, model_repo):
    xs = _sequence(10)
    with Client(native_server.address) as client:
        session = client.session("lstm")
        outputs = [session.step(xs[t]) for t in range(3)]
        outputs.extend(session.run(xs[3:7]))
        outputs.extend(session.stream(xs[7:]))
        assert session.seq == 10
        assert session.info().seq == 10
        assert session.end() is True
        assert session.end() is False
    np.testing.assert_allclose(
        np.stack(outputs), reference(model_repo, "lstm", xs[None])[0], atol=1e-5
    )


async def test_async_step_run_stream_equal_the_reference(native_server, model_repo):
    xs = _sequence(10, seed=1)
    async with AsyncClient(native_server.address) as client:
        async with await client.session("lstm") as session:
            outputs = [await session.step({"x": xs[t]}) for t in range(3)]
            outputs.extend(await session.run({"x": xs[3:7]}))
            outputs.extend([y async for y in session.stream(xs[7:])])
            assert session.seq == 10
            assert (await session.info()).seq == 10
        with pytest.raises(NotFound):  # the context manager ended it
            await client.attach("lstm", session.session_id)
    np.testing.assert_allclose(
        np.stack(outputs), reference(model_repo, "lstm", xs[None])[0], atol=1e-5
    )


def test_constants_export_import_attach_and_reset(native_server, model_repo):
    xs = _sequence(6, seed=2)
    context = np.array([0.5, -1.0], dtype="float32")
    expected = reference(model_repo, "ctx", xs[None], context[None])[0]
    with Client(native_server.address) as client:
        session = client.session("ctx", f"ctx-{uuid.uuid4().hex}", constants={"context": context})
        assert client.signature("ctx").constants[0].shape == (CONTEXT,)
        np.testing.assert_allclose(session.run(xs[:3]), expected[:3], atol=1e-5)

        exported = session.export()
        assert exported.info.seq == 3
        np.testing.assert_allclose(exported.constants["context"], context)
        copy = client.import_session("ctx", f"copy-{uuid.uuid4().hex}", exported)
        assert copy.seq == 3
        np.testing.assert_allclose(copy.run(xs[3:]), expected[3:], atol=1e-5)

        again = client.attach("ctx", session.session_id)  # another handle, same session
        assert again.seq == 3
        np.testing.assert_allclose(again.run(xs[3:]), expected[3:], atol=1e-5)

        assert session.reset().seq == 0
        assert session.seq == 0
        np.testing.assert_allclose(session.run(xs), expected, atol=1e-5)
        for handle in (session, copy):
            handle.end()


# -- errors --------------------------------------------------------------------------
def test_errors_become_client_errors_with_their_code(native_server):
    with Client(native_server.address) as client:
        with pytest.raises(NotFound) as missing_model:
            client.session("no-such-model")
        assert missing_model.value.code is grpc.StatusCode.NOT_FOUND
        assert isinstance(missing_model.value.__cause__, grpc.RpcError)

        with pytest.raises(NotFound):
            client.attach("lstm", "no-such-session")

        session = client.session("lstm")
        with pytest.raises(InvalidRequest) as bad_shape:
            session.step(np.zeros(FEATURES + 1, dtype="float32"))
        assert bad_shape.value.code is grpc.StatusCode.INVALID_ARGUMENT

        stale = client.attach("lstm", session.session_id)
        session.step(np.zeros(FEATURES, dtype="float32"))
        with pytest.raises(SeqConflict) as conflict:  # seq 0 expected, the session is at 1
            stale.step(np.zeros(FEATURES, dtype="float32"))
        assert conflict.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert conflict.value.current_seq == 1
        session.end()

    with (
        Client(_free_address(), retry=FAST_RETRY, timeout=5) as client,
        pytest.raises(ConnectionFailed) as down,
    ):
        client.list_models()
    assert down.value.code is grpc.StatusCode.UNAVAILABLE


# -- exactly-once retries ------------------------------------------------------------
class _LostReply(grpc.RpcError):
    """What a client sees when the connection dies after the server answered."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "reply lost (injected by the test)"

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def cancel(self) -> bool:
        return True

    def __iter__(self) -> _LostReply:
        return self

    def __next__(self) -> Any:
        raise self


class LoseOneStepReply(grpc.UnaryUnaryClientInterceptor):
    """Lets the `lose`-th Step reach the server and be applied, then loses its reply."""

    def __init__(self, lose: int) -> None:
        self.lose = lose
        self.sent: list[tuple[int, str]] = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        if not details.method.endswith("/Step"):
            return outcome
        self.sent.append((request.seq, request.request_id))
        if len(self.sent) == self.lose:
            outcome.result()  # applied on the server
            return _LostReply()
        return outcome


def test_a_retried_step_is_applied_once_and_replayed(native_server, model_repo):
    xs = _sequence(5, seed=3)
    lose = LoseOneStepReply(lose=3)
    with Client(native_server.address, interceptors=[lose], retry=FAST_RETRY) as client:
        session = client.session("lstm")
        outputs, replayed = [], []
        for t in range(5):
            outputs.append(session.step(xs[t]))
            replayed.append(session.last_replayed)
        assert session.info().seq == 5
    # The third step went out twice with the same seq and request id ...
    assert lose.sent[2] == lose.sent[3]
    assert [seq for seq, _ in lose.sent] == [0, 1, 2, 2, 3, 4]
    assert len({rid for _, rid in lose.sent}) == 5
    # ... and the second time the server answered with the stored reply.
    assert replayed == [False, False, True, False, False]
    np.testing.assert_allclose(
        np.stack(outputs), reference(model_repo, "lstm", xs[None])[0], atol=1e-5
    )


class BreakSequenceStream(grpc.UnaryStreamClientInterceptor):
    """Breaks the first RunSequenceStream: `deliver=None` fails it before it leaves;
    otherwise every reply is read (so the server applied every step) and only the
    first `deliver` reach the client before UNAVAILABLE."""

    def __init__(self, deliver: int | None) -> None:
        self.deliver = deliver
        self.calls: list[tuple[int, str]] = []

    def intercept_unary_stream(self, continuation, details, request):
        self.calls.append((request.seq, request.request_id))
        if len(self.calls) > 1:
            return continuation(details, request)
        if self.deliver is None:
            return _LostReply()
        replies = list(continuation(details, request))
        return _Delivered(replies[: self.deliver])


class _Delivered:
    def __init__(self, replies: list[Any]) -> None:
        self._replies = iter(replies)

    def __iter__(self) -> _Delivered:
        return self

    def __next__(self) -> Any:
        for reply in self._replies:
            return reply
        raise _LostReply()

    def cancel(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("deliver", "calls", "last_replayed"),
    [
        pytest.param(None, 2, False, id="failed-before-sending"),
        pytest.param(5, 1, True, id="last-reply-lost"),
    ],
)
def test_a_broken_sequence_resumes_without_loss_or_duplicate(
    native_server, model_repo, deliver, calls, last_replayed
):
    xs = _sequence(6, seed=4)
    broken = BreakSequenceStream(deliver)
    with Client(native_server.address, interceptors=[broken], retry=FAST_RETRY) as client:
        session = client.session("lstm")
        outputs = session.run(xs)
        assert session.last_replayed is last_replayed
        assert session.seq == 6
        assert session.info().seq == 6
        session.end()
    assert len(broken.calls) == calls
    np.testing.assert_allclose(outputs, reference(model_repo, "lstm", xs[None])[0], atol=1e-5)


def test_a_sequence_that_lost_several_replies_says_so(native_server):
    xs = _sequence(6, seed=5)
    with Client(
        native_server.address, interceptors=[BreakSequenceStream(2)], retry=FAST_RETRY
    ) as client:
        session = client.session("lstm")
        with pytest.raises(StepsLost) as lost:
            session.run(xs)
        assert (lost.value.acknowledged, lost.value.current_seq) == (2, 6)
        # The handle resynchronises: the next step continues from seq 6.
        session.step(xs[0])
        assert session.seq == 7
        session.end()


# -- failover ------------------------------------------------------------------------
def test_sync_client_fails_over_to_the_next_address(native_server):
    with Client([_free_address(), native_server.address], retry=FAST_RETRY) as client:
        session = client.session("lstm")
        y = session.step(np.ones(FEATURES, dtype="float32"))
        assert client.address == native_server.address
        assert y.shape == (OUTPUTS,)
        session.end()


async def test_async_client_fails_over_to_the_next_address(native_server, model_repo):
    xs = _sequence(4, seed=6)
    async with AsyncClient([_free_address(), native_server.address], retry=FAST_RETRY) as client:
        session = await client.session("lstm")
        outputs = await session.run(xs)
        assert client.address == native_server.address
        await session.end()
    np.testing.assert_allclose(outputs, reference(model_repo, "lstm", xs[None])[0], atol=1e-5)


# -- auth ----------------------------------------------------------------------------
def test_bearer_token_namespaces_sessions(model_repo):
    from rnnserve.service.settings import Settings

    settings = Settings(
        model_repository=model_repo,
        port=0,
        host="127.0.0.1",
        warmup=False,
        auth_tokens="alice-token=alice,bob-token=bob",
    )
    with ServerThread(settings) as running:
        with Client(running.address) as anonymous, pytest.raises(Unauthorized) as refused:
            anonymous.list_models()
        assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
        with (
            Client(running.address, token="alice-token") as alice,
            Client(running.address, token="bob-token") as bob,
        ):
            session = alice.session("lstm")
            session.step(np.zeros(FEATURES, dtype="float32"))
            with pytest.raises(NotFound):  # bob's namespace has no such session
                bob.attach("lstm", session.session_id)
            assert alice.attach("lstm", session.session_id).seq == 1


# -- a session rolled back under the client (a lost commit) --------------------------
def test_a_rolled_back_session_raises_session_rolled_back(native_server):
    """The store comes back behind what the client was acknowledged (here: an older
    copy imported over it, as a Redis failover would leave it): the next step names
    the missing steps instead of applying on the older state."""
    xs = _sequence(6, seed=7)
    with Client(native_server.address, retry=FAST_RETRY) as client:
        session = client.session("lstm")
        for t in range(3):
            session.step(xs[t])
        older = session.export()
        session.step(xs[3])
        session.step(xs[4])
        client.import_session("lstm", session.session_id, older)
        with pytest.raises(SessionRolledBack) as info:
            session.step(xs[5])
        error = info.value
        assert (error.stored_seq, error.requested_seq, error.missing) == (3, 5, 2)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "steps 4 to 5 are missing from the state store" in error.message
        assert session.info().seq == 3  # nothing was applied
        session.end()


async def test_async_a_rolled_back_session_raises_session_rolled_back(native_server):
    xs = _sequence(3, seed=8)
    async with AsyncClient(native_server.address, retry=FAST_RETRY) as client:
        session = await client.session("lstm")
        await session.step(xs[0])
        older = await session.export()
        await session.step(xs[1])
        await client.import_session("lstm", session.session_id, older)
        with pytest.raises(SessionRolledBack) as info:
            await session.step(xs[2])
        assert (info.value.stored_seq, info.value.requested_seq, info.value.missing) == (1, 2, 1)
        assert "step 2 is missing" in info.value.message
        await session.end()
