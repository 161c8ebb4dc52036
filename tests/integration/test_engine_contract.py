"""SessionEngine semantics, the same suite over the memory store and the real Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import numpy as np
import pytest
from _models import CONSTANTS, FEATURES, offline_run, step_function, token_model

from rnnserve.core import StepFunction
from rnnserve.service.engine import RunnerConfig, SessionEngine
from rnnserve.service.errors import (
    Internal,
    InvalidArgument,
    ModelNotFound,
    ModelVersionMismatch,
    QueueFull,
    SeqConflict,
    SessionNotFound,
    StoreUnavailable,
)
from rnnserve.service.store import StateStore

ATOL = 1e-5


def engine_for(
    store: StateStore, namespace: str, step: StepFunction, **config: object
) -> SessionEngine:
    engine = SessionEngine(store, namespace=namespace)
    engine.load_model("lstm", "1", step, config=RunnerConfig(**config))  # type: ignore[arg-type]
    return engine


async def test_concurrent_sessions_match_offline_reference(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    """200 sessions stepped in random interleavings (single steps with and without seq,
    and run_sequence chunks) == each session's sequence run alone; batches > 1 formed."""
    keras_model, step = lstm
    n_sessions, length = 200, 6
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n_sessions, length, FEATURES)).astype("float32")
    # The offline reference: each session alone through the core step function
    # (batch 1), and the original Keras model over the whole sequence.
    alone = [offline_run(step, xs[i]) for i in range(n_sessions)]
    keras_out = np.asarray(keras_model(xs))
    engine = engine_for(make_store(), namespace, step, max_queue_delay_s=0.005)
    async with engine:
        await asyncio.gather(*(engine.start("lstm", f"s{i}") for i in range(n_sessions)))
        outputs = np.zeros((n_sessions, length, 4), dtype="float32")
        seqs: dict[int, list[int]] = {i: [] for i in range(n_sessions)}

        async def client(i: int) -> None:
            r = random.Random(i)
            t = 0
            while t < length:
                await asyncio.sleep(r.random() * 0.003)
                mode = r.choice(["seq", "noseq", "sequence"])
                if mode == "sequence":
                    chunk = r.randint(1, length - t)
                    result = await engine.run_sequence(
                        "lstm", f"s{i}", [xs[i, t : t + chunk]], seq=t, request_id=f"r{i}-{t}"
                    )
                    outputs[i, t : t + chunk] = result.outputs[0]
                    t += chunk
                else:
                    res = await engine.step(
                        "lstm",
                        f"s{i}",
                        [xs[i, t]],
                        seq=t if mode == "seq" else None,
                        request_id=f"r{i}-{t}" if mode == "seq" else None,
                    )
                    outputs[i, t] = res.outputs[0]
                    t += 1
                    res_seq = res.seq
                    seqs[i].append(res_seq)
                    assert res_seq == t

        order = list(range(n_sessions))
        random.Random(1).shuffle(order)
        await asyncio.gather(*(client(i) for i in order))
        for i in range(n_sessions):
            np.testing.assert_allclose(outputs[i], alone[i][0], atol=ATOL)
            np.testing.assert_allclose(outputs[i], keras_out[i], atol=ATOL)
        finals = await asyncio.gather(
            *(engine.export_state("lstm", f"s{i}") for i in range(0, n_sessions, 7))
        )
        for i, record in zip(range(0, n_sessions, 7), finals, strict=True):
            assert record.seq == length
            for got, want in zip(record.states, alone[i][1], strict=True):
                np.testing.assert_allclose(got, want, atol=ATOL)
        stats = engine.runner("lstm").batcher.stats
        assert stats.max_batch_size > 1
        assert stats.requests >= n_sessions
        assert stats.mean_batch_size > 1


async def test_steps_without_seq_apply_in_arrival_order(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(1).standard_normal((20, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    async with engine_for(make_store(), namespace, step) as engine:
        await engine.start("lstm", "a")
        results = await asyncio.gather(*(engine.step("lstm", "a", [x]) for x in xs))
        assert [r.seq for r in results] == list(range(1, 21))
        np.testing.assert_allclose(np.stack([r.outputs[0] for r in results]), want, atol=ATOL)
        # at most one step of a session per batch: 20 steps took 20 batches
        assert engine.runner("lstm").batcher.stats.batches >= 20


async def test_retry_replays_and_conflicting_seq_fails(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(2).standard_normal((3, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs[:2])
    async with engine_for(make_store(), namespace, step) as engine:
        await engine.start("lstm", "a")
        first = await engine.step("lstm", "a", [xs[0]], seq=0, request_id="q0")
        assert (first.seq, first.replayed) == (1, False)
        before = await engine.export_state("lstm", "a")
        # the retry (same seq, same request id) replays, even with other inputs
        for again in await asyncio.gather(
            *(engine.step("lstm", "a", [xs[2]], seq=0, request_id="q0") for _ in range(3))
        ):
            assert (again.seq, again.replayed) == (1, True)
            np.testing.assert_array_equal(again.outputs[0], first.outputs[0])
        after = await engine.export_state("lstm", "a")
        assert after.seq == 1
        for a, b in zip(before.states, after.states, strict=True):
            np.testing.assert_array_equal(a, b)
        second = await engine.step("lstm", "a", [xs[1]], seq=1, request_id="q1")
        assert second.seq == 2
        np.testing.assert_allclose([first.outputs[0], second.outputs[0]], want, atol=ATOL)
        # the old retry is now two behind, a seq from the future, a reused id: conflicts
        for seq, rid in [(0, "q0"), (5, "q5"), (1, "q0"), (3, None)]:
            with pytest.raises(SeqConflict, match="is at seq 2") as info:
                await engine.step("lstm", "a", [xs[2]], seq=seq, request_id=rid)
            assert info.value.current_seq == 2
            assert info.value.code == "FAILED_PRECONDITION"
        # without seq, the last request id replays too
        again = await engine.step("lstm", "a", [xs[2]], request_id="q1")
        assert (again.seq, again.replayed) == (2, True)
        assert (await engine.get("lstm", "a")).seq == 2
        runner = engine.runner("lstm")
        assert runner.stats.replayed == 4
        assert runner.stats.seq_conflicts == 4


async def test_run_sequence_stops_at_first_failure(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(3).standard_normal((5, FEATURES)).astype("float32")
    async with engine_for(make_store(), namespace, step) as engine:
        await engine.start("lstm", "a")
        await engine.step("lstm", "a", [xs[0]])
        with pytest.raises(SeqConflict) as info:
            await engine.run_sequence("lstm", "a", [xs], seq=0)
        assert "0 of 5 step(s) applied" in " ".join(info.value.__notes__)
        assert (await engine.get("lstm", "a")).seq == 1
        result = await engine.run_sequence("lstm", "a", [xs[1:]], seq=1)
        want, _ = offline_run(step, xs)
        np.testing.assert_allclose(result.outputs[0], want[1:], atol=ATOL)
        assert result.seq == 5


async def test_iter_sequence_yields_each_step_and_stops_early(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(8).standard_normal((6, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    async with engine_for(make_store(), namespace, step) as engine:
        await engine.start("lstm", "a")
        seen = []
        async for t, result in engine.iter_sequence("lstm", "a", [xs], seq=0, request_id="r"):
            assert result.seq == t + 1
            np.testing.assert_allclose(result.outputs[0], want[t], atol=ATOL)
            seen.append(t)
        assert seen == list(range(6))
        await engine.start("lstm", "b")
        steps = engine.iter_sequence("lstm", "b", [xs])
        async for t, _ in steps:
            if t == 1:
                break
        await steps.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert (await engine.get("lstm", "b")).seq in (2, 3)  # at most one step ran ahead


async def test_lifecycle_get_end_reset_expiry(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(4).standard_normal((3, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    async with engine_for(make_store(), namespace, step, idle_timeout_s=30.0) as engine:
        info = await engine.start("lstm", "a")
        assert (info.seq, info.version) == (0, "1")
        await engine.step("lstm", "a", [xs[0]])
        await engine.step("lstm", "a", [xs[1]])
        got = await engine.get("lstm", "a")
        assert (got.seq, got.model, got.version, got.session_id) == (2, "lstm", "1", "a")
        assert got.expires_in_s is not None and 0 < got.expires_in_s <= 30
        assert got.updated_at >= got.created_at
        # reset: back to seq 0 and the initial state
        reset = await engine.reset("lstm", "a")
        assert reset.seq == 0
        out = await engine.step("lstm", "a", [xs[0]], seq=0)
        np.testing.assert_allclose(out.outputs[0], want[0], atol=ATOL)
        # end: gone; ending twice is fine; stepping it fails clearly
        assert await engine.end("lstm", "a") is True
        assert await engine.end("lstm", "a") is False
        with pytest.raises(SessionNotFound, match="'a'"):
            await engine.get("lstm", "a")
        with pytest.raises(SessionNotFound, match="does not exist"):
            await engine.step("lstm", "a", [xs[0]])
        with pytest.raises(SessionNotFound):
            await engine.reset("lstm", "a")
    async with engine_for(make_store(), namespace, step, idle_timeout_s=0.2) as engine:
        await engine.start("lstm", "b")
        await asyncio.sleep(0.6)
        with pytest.raises(SessionNotFound):
            await engine.step("lstm", "b", [xs[0]])


async def test_idle_timeout_is_refreshed_by_each_step(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    x = np.zeros(FEATURES, dtype="float32")
    async with engine_for(make_store(), namespace, step, idle_timeout_s=1.0) as engine:
        await engine.start("lstm", "a")
        for _ in range(6):  # 1.2 s in all, never 1 s idle
            await asyncio.sleep(0.2)
            await engine.step("lstm", "a", [x])
        assert (await engine.get("lstm", "a")).seq == 6


async def test_start_with_states_and_constants(
    make_store: Callable[[], StateStore], namespace: str, const_step
) -> None:
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((4, 5, FEATURES)).astype("float32")
    cs = rng.standard_normal((4, CONSTANTS)).astype("float32")
    h0 = rng.standard_normal((4, 16)).astype("float32")
    async with SessionEngine(make_store(), namespace=namespace) as engine:
        engine.load_model("rnn", "1", const_step)
        with pytest.raises(InvalidArgument, match="constant"):
            await engine.start("rnn", "x")
        for i in range(4):
            await engine.start(
                "rnn", f"s{i}", constants={"c": cs[i]}, initial_states=[h0[i]] if i % 2 else None
            )
        results = await asyncio.gather(
            *(engine.run_sequence("rnn", f"s{i}", {"x": xs[i]}) for i in range(4))
        )
        for i, result in enumerate(results):
            want, _ = offline_run(const_step, xs[i], [cs[i]], [h0[i]] if i % 2 else None)
            np.testing.assert_allclose(result.outputs[0], want, atol=ATOL)
        # reset keeps the constants
        await engine.reset("rnn", "s0")
        again = await engine.run_sequence("rnn", "s0", [xs[0]])
        np.testing.assert_allclose(again.outputs[0], results[0].outputs[0], atol=ATOL)
        exported = await engine.export_state("rnn", "s0")
        np.testing.assert_array_equal(exported.constants[0], cs[0])


async def test_scalar_token_inputs(make_store: Callable[[], StateStore], namespace: str) -> None:
    """A per-step input of shape () (token ids): 0-d arrays and plain ints both work."""
    model = token_model()
    step = step_function(model, max_batch_size=4)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype="int32")
    want = np.asarray(model(tokens[None]))[0]
    async with SessionEngine(make_store(), namespace=namespace) as engine:
        engine.load_model("chars", "1", step)
        await engine.start("chars", "a")
        first = await engine.step("chars", "a", [np.int32(tokens[0])])
        second = await engine.step("chars", "a", [int(tokens[1])])
        rest = await engine.run_sequence("chars", "a", [tokens[2:]])
        got = np.concatenate([[first.outputs[0], second.outputs[0]], rest.outputs[0]])
        np.testing.assert_allclose(got, want, atol=ATOL)
        with pytest.raises(InvalidArgument, match="dtype"):
            await engine.step("chars", "a", [np.float32(1.5)])


async def test_export_import_continues_identically(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(6).standard_normal((6, FEATURES)).astype("float32")
    async with engine_for(make_store(), namespace, step) as engine:
        await engine.start("lstm", "a")
        await engine.run_sequence("lstm", "a", [xs[:3]], seq=0, request_id="r")
        record = await engine.export_state("lstm", "a")
        assert (record.seq, record.last_request_id) == (3, "r#2")
        info = await engine.import_state("lstm", "b", record.encode())
        assert info.seq == 3
        a = await engine.run_sequence("lstm", "a", [xs[3:]])
        b = await engine.run_sequence("lstm", "b", [xs[3:]])
        np.testing.assert_array_equal(a.outputs[0], b.outputs[0])
        # exactly-once state carries over: the last step's retry replays on the copy
        await engine.import_state("lstm", "c", record)
        again = await engine.step("lstm", "c", [xs[0]], seq=2, request_id="r#2")
        assert again.replayed and again.seq == 3


async def test_model_version_mismatch_is_refused(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    x = np.zeros(FEATURES, dtype="float32")
    async with SessionEngine(make_store(), namespace=namespace) as engine:
        engine.load_model("lstm", "1", step)
        await engine.start("lstm", "a")
        engine.load_model("lstm", "2", step)  # now the default version
        with pytest.raises(ModelVersionMismatch, match=r"version '1'.*not 'lstm' version '2'"):
            await engine.step("lstm", "a", [x])
        with pytest.raises(ModelVersionMismatch):
            await engine.step("lstm", "a", [x], version="2")
        assert (await engine.step("lstm", "a", [x], version="1")).seq == 1
        with pytest.raises(ModelNotFound, match="no version '3'"):
            await engine.step("lstm", "a", [x], version="3")
        with pytest.raises(ModelNotFound, match="'other' is not loaded"):
            await engine.start("other", "a")
        record = await engine.export_state("lstm", "a")
        assert record.version == "1"


async def test_float16_state_storage(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(7).standard_normal((8, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    async with engine_for(make_store(), namespace, step, states_float16=True) as engine:
        await engine.start("lstm", "a")
        result = await engine.run_sequence("lstm", "a", [xs])
        np.testing.assert_allclose(result.outputs[0], want, atol=2e-2)
        record = await engine.export_state("lstm", "a")
        assert record.states_float16
        assert record.states[0].dtype == np.float32


async def test_bad_requests_fail_alone(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    x = np.zeros(FEATURES, dtype="float32")
    async with engine_for(make_store(), namespace, step, max_queue_size=4) as engine:
        await engine.start("lstm", "a")
        with pytest.raises(InvalidArgument, match=r"shape \(7,\), expected \(8,\)"):
            await engine.step("lstm", "a", [x[:7]])
        with pytest.raises(InvalidArgument, match="dtype"):
            await engine.step("lstm", "a", [np.zeros(FEATURES, dtype="complex64")])
        with pytest.raises(InvalidArgument, match="unknown input"):
            await engine.step("lstm", "a", {"nope": x})
        with pytest.raises(InvalidArgument, match="namespace"):
            await engine.step("lstm", "a", [x], namespace="a:b")
        # a bounded queue: more concurrent steps than it holds -> QueueFull, others fine
        outcomes = await asyncio.gather(
            *(engine.step("lstm", "a", [x]) for _ in range(12)), return_exceptions=True
        )
        assert any(isinstance(o, QueueFull) for o in outcomes)
        assert all(not isinstance(o, Exception) or isinstance(o, QueueFull) for o in outcomes)
        ok = [o for o in outcomes if not isinstance(o, BaseException)]
        assert (await engine.get("lstm", "a")).seq == len(ok)


async def test_nonfinite_steps_fail_alone_in_their_batch(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    """The nonfinite policy is applied per batch: in one batch of 8 sessions, the steps
    holding NaN or Inf are refused (their sessions unchanged), the others applied; with
    `reject_nonfinite=False` the same steps are applied."""
    _, step = lstm
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((8, FEATURES)).astype("float32")
    xs[2, 1] = np.nan
    xs[5, 0] = -np.inf
    bad = {2, 5}
    async with engine_for(
        make_store(), namespace, step, max_queue_delay_s=0.05, idle_dispatch=False
    ) as engine:
        sessions = [f"nf{i}" for i in range(8)]
        await asyncio.gather(*(engine.start("lstm", s) for s in sessions))
        outcomes = await asyncio.gather(
            *(engine.step("lstm", s, [x]) for s, x in zip(sessions, xs, strict=True)),
            return_exceptions=True,
        )
        assert engine.runner("lstm").batcher.stats.batches == 1  # one batch held them all
        for i, outcome in enumerate(outcomes):
            if i in bad:
                assert isinstance(outcome, InvalidArgument), outcome
                assert "NaN or infinite" in str(outcome)
            else:
                assert not isinstance(outcome, BaseException), outcome
                want = offline_run(step, xs[i : i + 1])[0][0]
                np.testing.assert_allclose(outcome.outputs[0], want, atol=ATOL)
        seqs = [(await engine.get("lstm", s)).seq for s in sessions]
        assert seqs == [0 if i in bad else 1 for i in range(8)]
    async with engine_for(make_store(), namespace, step, reject_nonfinite=False) as engine:
        await engine.start("lstm", "allowed")
        result = await engine.step("lstm", "allowed", [xs[2]])
        assert result.seq == 1


class LostReply:
    """A real store whose next commit is applied but answered with StoreUnavailable
    (the reply lost on the wire): the ambiguous failure exactly-once must survive."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self.lose_next = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def commit_many(self, commits):  # type: ignore[no-untyped-def]
        applied = await self._store.commit_many(commits)
        if self.lose_next:
            self.lose_next = False
            raise StoreUnavailable("redis commit script failed: reply lost (injected)")
        return applied


async def test_retry_after_a_lost_commit_reply_is_answered_once(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    xs = np.random.default_rng(10).standard_normal((2, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    store = LostReply(make_store())
    async with engine_for(store, namespace, step) as engine:  # type: ignore[arg-type]
        await engine.start("lstm", "a")
        store.lose_next = True
        with pytest.raises(StoreUnavailable):
            await engine.step("lstm", "a", [xs[0]], seq=0, request_id="a0")
        assert (await engine.get("lstm", "a")).seq == 1  # it did apply
        again = await engine.step("lstm", "a", [xs[0]], seq=0, request_id="a0")
        assert (again.seq, again.replayed) == (1, True)
        np.testing.assert_allclose(again.outputs[0], want[0], atol=ATOL)
        nxt = await engine.step("lstm", "a", [xs[1]], seq=1, request_id="a1")
        np.testing.assert_allclose(nxt.outputs[0], want[1], atol=ATOL)


class FailingOnce:
    """The real step function, except that its next call raises (a model error)."""

    def __init__(self, step: StepFunction) -> None:
        self._step = step
        self.signature = step.signature
        self.fail_next = False

    def __call__(self, *args):  # type: ignore[no-untyped-def]
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("kernel exploded")
        return self._step(*args)


async def test_a_model_error_fails_the_batch_steps_and_changes_nothing(
    make_store: Callable[[], StateStore], namespace: str, lstm
) -> None:
    _, step = lstm
    flaky = FailingOnce(step)
    xs = np.random.default_rng(11).standard_normal((2, FEATURES)).astype("float32")
    want, _ = offline_run(step, xs)
    async with SessionEngine(make_store(), namespace=namespace) as engine:
        engine.load_model("lstm", "1", flaky)  # type: ignore[arg-type]
        await engine.start("lstm", "a")
        first = await engine.step("lstm", "a", [xs[0]], seq=0, request_id="a0")
        flaky.fail_next = True
        with pytest.raises(Internal, match="step failed") as info:
            await engine.step("lstm", "a", [xs[1]], seq=1, request_id="a1")
        assert isinstance(info.value.__cause__, RuntimeError)
        assert (await engine.get("lstm", "a")).seq == 1
        second = await engine.step("lstm", "a", [xs[1]], seq=1, request_id="a1")
        np.testing.assert_allclose([first.outputs[0], second.outputs[0]], want, atol=ATOL)
