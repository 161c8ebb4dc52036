"""A model-checked session protocol: Hypothesis drives live servers at random.

Two in-process servers (replicas A and B) share one private redis-server; a third
(C, on the same Redis, another namespace) has an idle timeout of 0.04 s for expiry.
A `RuleBasedStateMachine` runs random sequences of valid and invalid operations on a
few sessions, each on replica A or B: start, step (unary Step, StepStream, a
one-row StepMany; seq current / none / stale / ahead / huge), retries of old
requests, RunSequence, reset, export, import, end, expiry on C, invalid requests,
StepMany with one session in two rows, and two steps of one session at once on both
replicas (which must match one of the two serial orders).

Every answer is checked against a pure-Python model of the protocol
(docs/protocol.md: seq, request ids, replays, conflicts, rolled-back sessions) and
every output against the offline Keras step; after each operation the records in
Redis are read back and compared with the model (seq and states).

`RNNSERVE_STATE_MACHINE_EXAMPLES` (default 200) sets the number of sequences.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from rnnserve.core import StepFunction, from_keras
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.record import SessionRecord
from rnnserve.service.settings import Settings
from rnnserve.service.store import session_key
from rnnserve.service.wire import decode_tensor, encode_tensor
from tests.models import FEATURES, write_repository
from tests.redis_servers import RedisProcess
from tests.servers import ServerThread

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("RNNSERVE_STATE_MACHINE_EXAMPLES", "200"))
NAMESPACE = "sm"
ATOL = 1e-5
UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1


@dataclass
class Live:
    """The model's view of one session."""

    seq: int
    states: list[np.ndarray]
    last_rid: str = ""
    last_outputs: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))


@dataclass(frozen=True)
class Sent:
    """A step request as sent (kept for retries)."""

    seq: int | None
    rid: str
    x: np.ndarray


@dataclass
class Expect:
    """What the model says a step gets: applied, replayed, or an error."""

    kind: str  # "apply", "replay", "not_found", "conflict", "rolled_back"
    seq: int = 0

    def check_error(self, code: grpc.StatusCode, message: str, live: Live | None) -> None:
        want = {
            "not_found": grpc.StatusCode.NOT_FOUND,
            "conflict": grpc.StatusCode.FAILED_PRECONDITION,
            "rolled_back": grpc.StatusCode.FAILED_PRECONDITION,
        }[self.kind]
        assert code == want, (code, message, self.kind)
        if self.kind == "conflict":
            assert live is not None
            assert f"is at seq {live.seq}; the step expected seq {self.seq}" in message, message
        if self.kind == "rolled_back":
            assert live is not None
            assert f"is at seq {live.seq} but this step expected seq {self.seq}" in message
            assert "missing from the state store" in message, message


def judge(live: Live | None, seq: int | None, rid: str) -> Expect:
    """The protocol, as docs/protocol.md states it."""
    if live is None:
        return Expect("not_found")
    if rid == live.last_rid and (seq is None or seq == live.seq - 1):
        return Expect("replay", live.seq)
    if seq is None or seq == live.seq:
        return Expect("apply", live.seq + 1)
    if seq > live.seq:
        return Expect("rolled_back", seq)
    return Expect("conflict", seq)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("state-machine")
    repo = write_repository(root / "models")
    server = RedisProcess(root / "redis")
    server.start()
    base = {
        "model_repository": repo, "port": 0, "host": "127.0.0.1", "warmup": False,
        "redis_url": server.url,
    }  # fmt: skip
    model = keras.models.load_model(repo / "lstm" / "1" / "model.keras", compile=False)
    step = StepFunction(from_keras(model), max_batch_size=2)
    try:
        with (
            ServerThread(Settings(**base, namespace=NAMESPACE)) as a,
            ServerThread(Settings(**base, namespace=NAMESPACE)) as b,
            ServerThread(Settings(**base, namespace="sm-expiry", idle_timeout_s=0.04)) as c,
        ):
            channels = [grpc.insecure_channel(s.address) for s in (a, b, c)]
            client = server.client()
            try:
                yield {
                    "stubs": [pb_grpc.RecurrentStub(ch) for ch in channels],
                    "redis": client,
                    "step": step,
                }
            finally:
                client.close()
                for channel in channels:
                    channel.close()
    finally:
        server.kill()


def test_the_session_protocol_state_machine(world: dict[str, Any]) -> None:
    stubs: list[pb_grpc.RecurrentStub] = world["stubs"]
    store: redis.Redis = world["redis"]
    step_fn: StepFunction = world["step"]
    initial = [s[0] for s in step_fn.signature.initial_states(1)]
    examples = itertools.count()
    counts = {"sequences": 0, "operations": 0}
    pool = ThreadPoolExecutor(2)

    def reference(states: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs, new = step_fn([x[None]], [], [s[None] for s in states])
        return outputs[0][0], [s[0] for s in new]

    xs = st.lists(
        st.floats(-2, 2, allow_nan=False, width=32), min_size=FEATURES, max_size=FEATURES
    ).map(lambda v: np.asarray(v, np.float32))

    class Protocol(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(examples)
            counts["sequences"] += 1
            self.ids = [f"e{n}-s{k}" for k in range(3)]
            self.live: dict[str, Live] = {}
            self.sent: dict[str, list[Sent]] = {s: [] for s in self.ids}
            self.exported: list[tuple[bytes, Live]] = []
            self.rids = itertools.count()
            self.expired = False

        # -- helpers --------------------------------------------------------------
        def rid(self) -> str:
            return f"r{next(self.rids)}"

        def applied(self, sid: str, rid: str, x: np.ndarray, reply_seq: int, out: Any) -> None:
            live = self.live[sid]
            want, states = reference(live.states, x)
            np.testing.assert_allclose(np.asarray(out), want, atol=ATOL)
            assert reply_seq == live.seq + 1
            live.seq, live.states, live.last_rid, live.last_outputs = (
                reply_seq, states, rid, want
            )  # fmt: skip

        def settle(
            self, sid: str, sent: Sent, code: grpc.StatusCode, message: str,
            seq: int, replayed: bool, out: Any,
        ) -> None:  # fmt: skip
            """Check one step's answer against the model, and advance the model."""
            counts["operations"] += 1
            live = self.live.get(sid)
            expect = judge(live, sent.seq, sent.rid)
            if expect.kind == "apply":
                assert code == grpc.StatusCode.OK, (code, message)
                assert not replayed
                self.applied(sid, sent.rid, sent.x, seq, out)
            elif expect.kind == "replay":
                assert code == grpc.StatusCode.OK, (code, message)
                assert replayed and live is not None and seq == live.seq
                np.testing.assert_allclose(np.asarray(out), live.last_outputs, atol=ATOL)
            else:
                expect.check_error(code, message, live)

        def unary(self, server: int, sid: str, sent: Sent) -> tuple[Any, ...]:
            request = pb.StepRequest(
                model="lstm", session_id=sid, request_id=sent.rid,
                inputs=[encode_tensor("x", sent.x)],
            )  # fmt: skip
            if sent.seq is not None:
                request.seq = sent.seq
            try:
                reply = stubs[server].Step(request, timeout=30)
            except grpc.RpcError as exc:
                return exc.code(), exc.details(), 0, False, None
            return (
                grpc.StatusCode.OK,
                "",
                reply.seq,
                reply.replayed,
                decode_tensor(reply.outputs[0]),
            )

        def send(self, server: int, sid: str, sent: Sent, mode: str) -> None:
            self.sent[sid].append(sent)
            if mode == "unary":
                self.settle(sid, sent, *self.unary(server, sid, sent))
            elif mode == "stream":
                request = pb.StepRequest(
                    model="lstm", session_id=sid, request_id=sent.rid,
                    inputs=[encode_tensor("x", sent.x)],
                )  # fmt: skip
                if sent.seq is not None:
                    request.seq = sent.seq
                (reply,) = list(stubs[server].StepStream(iter([request]), timeout=30))
                if reply.HasField("error"):
                    code = _code(reply.error.code)
                    self.settle(sid, sent, code, reply.error.message, 0, False, None)
                else:
                    out = decode_tensor(reply.outputs[0])
                    self.settle(sid, sent, grpc.StatusCode.OK, "", reply.seq, reply.replayed, out)
            else:
                seq = -1 if sent.seq is None else min(sent.seq, INT64_MAX)
                reply = stubs[server].StepMany(
                    pb.StepManyRequest(
                        model="lstm", session_ids=[sid], seqs=[seq], request_ids=[sent.rid],
                        inputs=[encode_tensor("x", sent.x[None])],
                    ),
                    timeout=30,
                )  # fmt: skip
                out = decode_tensor(reply.outputs[0])[0]
                self.settle(
                    sid, Sent(None if seq < 0 else seq, sent.rid, sent.x),
                    _code(reply.codes[0]), reply.messages[0], reply.seqs[0], reply.replayed[0], out,
                )  # fmt: skip

        # -- rules ----------------------------------------------------------------
        @rule(k=st.integers(0, 2), server=st.integers(0, 1))
        def start(self, k: int, server: int) -> None:
            sid = self.ids[k]
            reply = stubs[server].StartSession(
                pb.StartSessionRequest(model="lstm", session_id=sid), timeout=30
            )
            counts["operations"] += 1
            assert reply.session.seq == 0
            self.live[sid] = Live(0, [s.copy() for s in initial])

        @rule(
            k=st.integers(0, 2), server=st.integers(0, 1), x=xs,
            mode=st.sampled_from(["unary", "stream", "many"]),
            which=st.sampled_from(["current", "none", "stale", "ahead", "huge"]),
            ahead=st.integers(1, 5),
        )  # fmt: skip
        def step(
            self, k: int, server: int, x: np.ndarray, mode: str, which: str, ahead: int
        ) -> None:
            sid = self.ids[k]
            live = self.live.get(sid)
            current = live.seq if live is not None else 0
            seq: int | None = {
                "current": current,
                "none": None,
                "stale": max(0, current - 1),
                "ahead": current + ahead,
                "huge": UINT64_MAX,
            }[which]
            self.send(server, sid, Sent(seq, self.rid(), x), mode)

        @rule(k=st.integers(0, 2), server=st.integers(0, 1), back=st.integers(1, 4))
        def retry(self, k: int, server: int, back: int) -> None:
            """Send an earlier request of this session again, exactly as it was."""
            sid = self.ids[k]
            if self.sent[sid]:
                old = self.sent[sid][-min(back, len(self.sent[sid]))]
                self.send(server, sid, old, "unary")

        @rule(k=st.integers(0, 2), server=st.integers(0, 1), steps=st.lists(xs, min_size=1, max_size=4),
              with_seq=st.booleans())  # fmt: skip
        def run(self, k: int, server: int, steps: list[np.ndarray], with_seq: bool) -> None:
            sid = self.ids[k]
            live = self.live.get(sid)
            rid = self.rid()
            request = pb.RunSequenceRequest(
                model="lstm", session_id=sid, request_id=rid,
                inputs=[encode_tensor("x", np.stack(steps))],
            )  # fmt: skip
            base = live.seq if live is not None else 0
            if with_seq:
                request.seq = base
            counts["operations"] += 1
            try:
                reply = stubs[server].RunSequence(request, timeout=30)
            except grpc.RpcError as exc:
                assert live is None and exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
                return
            assert live is not None
            outputs = decode_tensor(reply.outputs[0])
            for t, x in enumerate(steps):
                self.applied(sid, f"{rid}#{t}", x, base + t + 1, outputs[t])
            assert reply.seq == base + len(steps)

        @rule(k=st.integers(0, 2), server=st.integers(0, 1))
        def reset(self, k: int, server: int) -> None:
            sid = self.ids[k]
            counts["operations"] += 1
            try:
                reply = stubs[server].ResetSession(
                    pb.ResetSessionRequest(session=pb.SessionRef(model="lstm", session_id=sid)),
                    timeout=30,
                )
            except grpc.RpcError as exc:
                assert sid not in self.live and exc.code() == grpc.StatusCode.NOT_FOUND
                return
            assert reply.seq == 0
            self.live[sid] = Live(0, [s.copy() for s in initial])

        @rule(k=st.integers(0, 2), server=st.integers(0, 1))
        def export(self, k: int, server: int) -> None:
            sid = self.ids[k]
            counts["operations"] += 1
            try:
                reply = stubs[server].ExportState(
                    pb.SessionRef(model="lstm", session_id=sid), timeout=30
                )
            except grpc.RpcError as exc:
                assert sid not in self.live and exc.code() == grpc.StatusCode.NOT_FOUND
                return
            live = self.live[sid]
            assert reply.session.seq == live.seq
            for got, want in zip(reply.states, live.states, strict=True):
                np.testing.assert_allclose(decode_tensor(got), want, atol=ATOL)
            self.exported.append((reply.record, copy.deepcopy(live)))

        @rule(k=st.integers(0, 2), server=st.integers(0, 1), pick=st.integers(0, 10))
        def import_(self, k: int, server: int, pick: int) -> None:
            if not self.exported:
                return
            record, live = self.exported[pick % len(self.exported)]
            sid = self.ids[k]
            counts["operations"] += 1
            reply = stubs[server].ImportState(
                pb.ImportStateRequest(
                    session=pb.SessionRef(model="lstm", session_id=sid), record=record
                ),
                timeout=30,
            )
            assert reply.seq == live.seq
            self.live[sid] = copy.deepcopy(live)  # its seq and retry memory come along

        @rule(k=st.integers(0, 2), server=st.integers(0, 1))
        def end(self, k: int, server: int) -> None:
            sid = self.ids[k]
            counts["operations"] += 1
            reply = stubs[server].EndSession(
                pb.SessionRef(model="lstm", session_id=sid), timeout=30
            )
            assert reply.existed == (sid in self.live)
            self.live.pop(sid, None)

        @precondition(lambda self: not self.expired)
        @rule(x=xs)
        def expire(self, x: np.ndarray) -> None:
            """On C (idle timeout 0.04 s): a session left alone for 0.1 s is gone (once
            per sequence: it sleeps)."""
            self.expired = True
            sid = f"{self.ids[0]}-expiring"
            counts["operations"] += 1
            stubs[2].StartSession(pb.StartSessionRequest(model="lstm", session_id=sid), timeout=30)
            time.sleep(0.1)
            for call in (
                lambda: stubs[2].GetSession(pb.SessionRef(model="lstm", session_id=sid)),
                lambda: stubs[2].Step(
                    pb.StepRequest(model="lstm", session_id=sid, inputs=[encode_tensor("x", x)])
                ),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()

        @rule(
            k=st.integers(0, 2), server=st.integers(0, 1),
            bad=st.sampled_from(["shape", "bytes", "name", "model", "session id", "request id"]),
        )  # fmt: skip
        def invalid(self, k: int, server: int, bad: str) -> None:
            """A malformed step is refused and changes nothing (the invariant checks)."""
            sid = self.ids[k]
            x = np.zeros(FEATURES, np.float32)
            request = pb.StepRequest(
                model="lstm", session_id=sid, request_id=self.rid(), inputs=[encode_tensor("x", x)]
            )
            want = grpc.StatusCode.INVALID_ARGUMENT
            if bad == "shape":
                request.inputs[0].CopyFrom(encode_tensor("x", np.zeros(FEATURES + 1, np.float32)))
            elif bad == "bytes":
                request.inputs[0].data = b"\x00" * 3  # not FEATURES float32s
            elif bad == "name":
                request.inputs[0].name = "nope"
            elif bad == "model":
                request.model, want = "nope", grpc.StatusCode.NOT_FOUND
            elif bad == "session id":
                request.session_id = ""
            else:
                request.request_id = "r" * 300
            counts["operations"] += 1
            with pytest.raises(grpc.RpcError) as info:
                stubs[server].Step(request, timeout=30)
            assert info.value.code() == want, (bad, info.value.details())

        @rule(k=st.integers(0, 2), server=st.integers(0, 1), x1=xs, x2=xs, with_seq=st.booleans())
        def two_rows(
            self, k: int, server: int, x1: np.ndarray, x2: np.ndarray, with_seq: bool
        ) -> None:
            """StepMany with one session in two rows: two consecutive steps, in row order."""
            sid = self.ids[k]
            live = self.live.get(sid)
            base = live.seq if live is not None else 0
            rids = [self.rid(), self.rid()]
            seqs = [base, base + 1] if with_seq else [-1, -1]
            reply = stubs[server].StepMany(
                pb.StepManyRequest(
                    model="lstm", session_ids=[sid, sid], seqs=seqs, request_ids=rids,
                    inputs=[encode_tensor("x", np.stack([x1, x2]))],
                ),
                timeout=30,
            )  # fmt: skip
            outs = decode_tensor(reply.outputs[0])
            for row, x in enumerate((x1, x2)):
                sent = Sent(None if seqs[row] < 0 else seqs[row], rids[row], x)
                self.sent[sid].append(sent)
                self.settle(
                    sid, sent, _code(reply.codes[row]), reply.messages[row],
                    reply.seqs[row], reply.replayed[row], outs[row],
                )  # fmt: skip

        @rule(k=st.integers(0, 2), x1=xs, x2=xs, with_seq=st.booleans())
        def at_once(self, k: int, x1: np.ndarray, x2: np.ndarray, with_seq: bool) -> None:
            """One step on A and one on B of the same session, at the same time: the
            outcome is that of one of the two serial orders."""
            sid = self.ids[k]
            live = self.live.get(sid)
            seq = (live.seq if live is not None else 0) if with_seq else None
            sends = [Sent(seq, self.rid(), x1), Sent(seq, self.rid(), x2)]
            answers = list(pool.map(lambda i: self.unary(i, sid, sends[i]), (0, 1)))
            self.sent[sid].extend(sends)
            orders = [(0, 1), (1, 0)]
            if live is not None:
                # The first applied is the one whose reply carries the lower seq.
                ok = [i for i in (0, 1) if answers[i][0] == grpc.StatusCode.OK]
                if len(ok) == 2:
                    orders = [tuple(sorted(ok, key=lambda i: answers[i][2]))]
                elif len(ok) == 1:
                    orders = [(ok[0], 1 - ok[0])]
            for first, second in orders[:1]:
                for i in (first, second):
                    self.settle(sid, sends[i], *answers[i])

        @invariant()
        def records_match_the_model(self) -> None:
            keys = [session_key(NAMESPACE, "lstm", s) for s in self.ids]
            for sid, raw in zip(self.ids, store.mget(keys), strict=True):
                live = self.live.get(sid)
                assert (raw is None) == (live is None), sid
                if raw is not None and live is not None:
                    record = SessionRecord.decode(raw)
                    assert record.seq == live.seq
                    assert record.last_request_id == live.last_rid
                    for got, want in zip(record.states, live.states, strict=True):
                        np.testing.assert_allclose(got, want, atol=ATOL)

    started = time.perf_counter()
    try:
        run_state_machine_as_test(
            Protocol,
            settings=settings(
                max_examples=EXAMPLES, stateful_step_count=30, deadline=None, database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )  # fmt: skip
    finally:
        pool.shutdown()
    seconds = time.perf_counter() - started
    print(
        f"\nstate machine: {counts['sequences']} sequences, {counts['operations']} operations "
        f"in {seconds:.1f} s"
    )
    assert counts["sequences"] >= EXAMPLES


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _code(value: int) -> grpc.StatusCode:
    return _CODES[value]
