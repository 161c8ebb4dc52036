"""rnnserve.client's `step_many` (sync and asyncio) and `AsyncClient.step_many_stream`
against real servers (memory and Redis stores): outputs row by row against the offline
Keras reference, per-row errors as the client's exceptions, message-level refusals,
exactly-once retries of a whole message.

The lost reply is injected with a grpc client interceptor that lets the server apply
the message and then drops its reply, so the server under test is always the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import (
    AsyncClient,
    Client,
    ClientError,
    ConnectionFailed,
    InvalidRequest,
    ManyResult,
    NotFound,
    RetryPolicy,
    SeqConflict,
    SessionRolledBack,
)
from tests.integration._grpc_util import cached_reference, running_server, xs
from tests.models import FEATURES, OUTPUTS
from tests.servers import ServerThread, unique

ATOL = 1e-5
OK = grpc.StatusCode.OK
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(
    scope="module", params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]
)
def server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[ServerThread]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_server(model_repo, redis_url=url, warmup=False) as running:
        yield running


def start(client: Client, n: int) -> list[str]:
    return [client.session("lstm", unique("many")).session_id for _ in range(n)]


def assert_all_ok(result: ManyResult, n: int, seq: int) -> None:
    assert result.codes == (OK,) * n, result.messages
    assert result.messages == ("",) * n
    assert result.ok.dtype == bool and result.ok.all()
    assert result.errors() == {}
    assert result.seqs.dtype == np.uint64
    assert result.seqs.tolist() == [seq] * n
    assert result.replayed.dtype == bool


# -- outputs -------------------------------------------------------------------------
def test_sync_step_many_equals_the_reference(server, model_repo):
    n, steps = 5, 4
    inputs = xs(n, steps, seed=21)
    want = cached_reference(model_repo, "lstm", inputs)
    with Client(server.address) as client:
        ids = start(client, n)
        for t in range(steps):
            x = inputs[:, t] if t % 2 else {"x": inputs[:, t]}  # one array or by name
            seqs = [t] * n if t < 2 else None  # with and without seqs
            result = client.step_many("lstm", ids, x, seqs=seqs)
            assert result.session_ids == tuple(ids)
            assert_all_ok(result, n, t + 1)
            assert not result.replayed.any()
            assert list(result.outputs) == ["y"]
            assert result.outputs["y"].shape == (n, OUTPUTS)
            np.testing.assert_allclose(result.outputs["y"], want[:, t], atol=ATOL)
        assert [client.attach("lstm", i).seq for i in ids] == [steps] * n


async def test_async_step_many_equals_the_reference(server, model_repo):
    n, steps = 4, 3
    inputs = xs(n, steps, seed=22)
    want = cached_reference(model_repo, "lstm", inputs)
    async with AsyncClient(server.address) as client:
        ids = [(await client.session("lstm")).session_id for _ in range(n)]
        for t in range(steps):
            result = await client.step_many("lstm", ids, inputs[:, t], seqs=[t] * n)
            assert_all_ok(result, n, t + 1)
            np.testing.assert_allclose(result.outputs["y"], want[:, t], atol=ATOL)


def test_two_rows_of_one_session_are_consecutive_steps(server, model_repo):
    inputs = xs(2, 3, seed=23)
    want = cached_reference(model_repo, "lstm", inputs)
    with Client(server.address) as client:
        a, b = start(client, 2)
        x = np.stack([inputs[0, 0], inputs[1, 0], inputs[0, 1], inputs[0, 2]])
        result = client.step_many("lstm", [a, b, a, a], x, seqs=[0, None, 1, 2])
        assert result.codes == (OK,) * 4, result.messages
        assert result.seqs.tolist() == [1, 1, 2, 3]
        np.testing.assert_allclose(result.outputs["y"][[0, 2, 3]], want[0], atol=ATOL)
        np.testing.assert_allclose(result.outputs["y"][1], want[1, 0], atol=ATOL)


# -- streams -------------------------------------------------------------------------
async def test_stream_sends_equal_the_reference_and_pipeline(server, model_repo):
    n, steps = 6, 6
    inputs = xs(n, steps, seed=24)
    want = cached_reference(model_repo, "lstm", inputs)
    async with AsyncClient(server.address) as client:
        ids = [(await client.session("lstm")).session_id for _ in range(n)]
        async with client.step_many_stream("lstm") as stream:
            for t in range(3):  # one message at a time, with seqs
                result = await stream.send(ids, inputs[:, t], seqs=[t] * n)
                assert_all_ok(result, n, t + 1)
                np.testing.assert_allclose(result.outputs["y"], want[:, t], atol=ATOL)
            # the rest in flight together, no seqs: sent in call order, applied in order
            results = await asyncio.gather(
                *(stream.send(ids, {"x": inputs[:, t]}) for t in range(3, steps))
            )
        for t, result in zip(range(3, steps), results, strict=True):
            assert_all_ok(result, n, t + 1)
            np.testing.assert_allclose(result.outputs["y"], want[:, t], atol=ATOL)
        with pytest.raises(ClientError, match="closed"):  # after the block
            await stream.send(ids, inputs[:, 0])


async def test_stream_refused_messages_raise_and_the_stream_goes_on(server, model_repo):
    inputs = xs(2, 2, seed=25)
    want = cached_reference(model_repo, "lstm", inputs)
    async with AsyncClient(server.address) as client:
        ids = [(await client.session("lstm")).session_id for _ in range(2)]
        async with client.step_many_stream("lstm") as stream:
            result = await stream.send(ids, inputs[:, 0], seqs=[0, 0])
            np.testing.assert_allclose(result.outputs["y"], want[:, 0], atol=ATOL)
            with pytest.raises(InvalidRequest, match=r"shape \(2, 5\), expected \(2, 4\)") as bad:
                await stream.send(ids, np.zeros((2, FEATURES + 1), "float32"))
            assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidRequest, match="1 seqs for 2 rows"):
                await stream.send(ids, inputs[:, 1], seqs=[1])
            # a bad row is not a refused message: it comes back in the result
            result = await stream.send(
                [ids[0], "never-started", ids[1]],
                np.stack([inputs[0, 1], inputs[0, 1], inputs[1, 1]]),
            )
            assert result.codes == (OK, grpc.StatusCode.NOT_FOUND, OK)
            assert isinstance(result.errors()[1], NotFound)
            np.testing.assert_allclose(result.outputs["y"][[0, 2]], want[:, 1], atol=ATOL)


async def test_a_broken_stream_fails_its_sends(server):
    async with AsyncClient(server.address, stream_timeout=0.5) as client:
        session = await client.session("lstm")
        async with client.step_many_stream("lstm") as stream:
            await asyncio.sleep(1.0)  # the call's deadline passes
            with pytest.raises(ConnectionFailed) as broken:
                await stream.send([session.session_id], np.zeros((1, FEATURES), "float32"))
            assert broken.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await session.info()).seq == 0


# -- errors --------------------------------------------------------------------------
def test_bad_rows_fail_alone_as_client_errors(server, model_repo):
    inputs = xs(3, 1, seed=26)
    want = cached_reference(model_repo, "lstm", inputs)
    with Client(server.address) as client:
        good = start(client, 3)
        stale = client.session("lstm").session_id
        missing = "never-started-" + unique("x")
        rows = [good[0], missing, good[1], stale, good[2]]
        x = np.stack([inputs[0, 0], inputs[0, 0], inputs[1, 0], inputs[0, 0], inputs[2, 0]])
        result = client.step_many("lstm", rows, x, seqs=[0, None, 0, 4, 0])
        assert result.codes == (
            OK,
            grpc.StatusCode.NOT_FOUND,
            OK,
            grpc.StatusCode.FAILED_PRECONDITION,
            OK,
        )
        assert result.ok.tolist() == [True, False, True, False, True]
        assert result.seqs.tolist() == [1, 0, 1, 0, 1]
        errors = result.errors()
        assert sorted(errors) == [1, 3]
        assert isinstance(errors[1], NotFound)
        assert errors[1].code is grpc.StatusCode.NOT_FOUND
        assert "does not exist" in errors[1].message == result.messages[1]
        # A seq ahead of the session's: steps the store does not have (a lost commit).
        assert isinstance(errors[3], SessionRolledBack)
        assert (errors[3].current_seq, errors[3].requested_seq, errors[3].missing) == (0, 4, 4)
        np.testing.assert_allclose(result.outputs["y"][result.ok], want[:, 0], atol=ATOL)
        assert not result.outputs["y"][~result.ok].any()  # failed rows hold zeros
        assert client.attach("lstm", stale).seq == 0  # untouched


async def test_refused_messages_raise(server):
    async with AsyncClient(server.address) as client:
        ids = [(await client.session("lstm")).session_id for _ in range(2)]
        with pytest.raises(InvalidRequest, match="3 request ids for 2 rows"):
            await client.step_many(
                "lstm", ids, np.zeros((2, FEATURES), "float32"), request_ids=["a", "b", "c"]
            )
        with pytest.raises(InvalidRequest, match="not one string"):
            await client.step_many("lstm", ids[0], np.zeros((1, FEATURES), "float32"))
        with pytest.raises(NotFound, match="'nope' is not loaded"):
            await client.step_many("nope", ids, np.zeros((2, FEATURES), "float32"))
        for session_id in ids:
            assert (await client.attach("lstm", session_id)).seq == 0


# -- exactly-once --------------------------------------------------------------------
def test_a_resent_message_is_replayed_not_applied_twice(server, model_repo):
    n, steps = 3, 3
    inputs = xs(n, steps, seed=27)
    want = cached_reference(model_repo, "lstm", inputs)
    with Client(server.address) as client:
        ids = start(client, n)
        for t in range(steps):
            request_ids = [f"{i}-{t}" for i in range(n)]
            first = client.step_many(
                "lstm", ids, inputs[:, t], seqs=[t] * n, request_ids=request_ids
            )
            again = client.step_many(
                "lstm", ids, inputs[:, t], seqs=[t] * n, request_ids=request_ids
            )
            assert first.codes == again.codes == (OK,) * n
            assert not first.replayed.any()
            assert again.replayed.all()
            assert first.seqs.tolist() == again.seqs.tolist() == [t + 1] * n
            np.testing.assert_array_equal(again.outputs["y"], first.outputs["y"])
            np.testing.assert_allclose(first.outputs["y"], want[:, t], atol=ATOL)
        assert [client.attach("lstm", i).seq for i in ids] == [steps] * n
        # two rows of one session: only its last reply is kept, so a resent message
        # replays the last row and says the earlier one's seq is past
        a = ids[0]
        x = inputs[:2, 0]
        first = client.step_many("lstm", [a, a], x, seqs=[steps, steps + 1], request_ids=["p", "q"])
        again = client.step_many("lstm", [a, a], x, seqs=[steps, steps + 1], request_ids=["p", "q"])
        assert first.seqs.tolist() == [steps + 1, steps + 2] and not first.replayed.any()
        assert again.codes == (grpc.StatusCode.FAILED_PRECONDITION, OK)
        assert again.replayed.tolist() == [False, True]
        (error,) = again.errors().values()
        assert isinstance(error, SeqConflict) and error.current_seq == steps + 2
        np.testing.assert_array_equal(again.outputs["y"][1], first.outputs["y"][1])


class _LostReply(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "reply lost (injected by the test)"

    def result(self, timeout: float | None = None) -> Any:
        raise self


class LoseFirstStepManyReply(grpc.UnaryUnaryClientInterceptor):
    """Lets the first StepMany reach the server and be applied, then loses its reply."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        if not details.method.endswith("/StepMany"):
            return outcome
        self.sent.append(request)
        if len(self.sent) == 1:
            outcome.result()  # applied on the server
            return _LostReply()
        return outcome


def test_a_lost_reply_is_retried_exactly_once(server, model_repo):
    n = 4
    inputs = xs(n, 1, seed=28)
    want = cached_reference(model_repo, "lstm", inputs)
    lose = LoseFirstStepManyReply()
    with Client(server.address, interceptors=[lose], retry=FAST_RETRY) as client:
        ids = start(client, n)
        result = client.step_many("lstm", ids, inputs[:, 0], seqs=[0] * n)  # ids made here
        assert result.codes == (OK,) * n
        assert result.replayed.all()  # the retry got the stored replies
        assert result.seqs.tolist() == [1] * n
        np.testing.assert_allclose(result.outputs["y"], want[:, 0], atol=ATOL)
        assert [client.attach("lstm", i).seq for i in ids] == [1] * n
    first, retry = lose.sent
    assert first == retry  # the same message, the same request ids
    assert len(set(first.request_ids)) == n
