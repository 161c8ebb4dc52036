"""`SessionEngine`: stateful steps of many sessions, batched across sessions.

One `ModelRunner` per loaded model version owns the compiled `StepFunction`, a
`DynamicBatcher` and an executor. A step travels (DESIGN §3)::

    engine.step() -> batcher (one step per session per batch, in order)
      -> store.load_many(keys)             one round trip
      -> stack states, step in executor    the event loop never blocks
      -> store.commit_many(commits)        one round trip, compare-and-set per session
      -> each caller's future

Semantics of a step on a session whose record is at `current` seq:

- `seq is None`: applies in arrival order.
- `seq == current`: applies; the reply carries `current + 1`.
- `seq == current - 1` and the same request id as the step that made `current`: a
  retry; the stored reply (last outputs) is returned and nothing changes.
  (A step without `seq` but with the last step's request id is treated the same.)
- otherwise: `SeqConflict` naming `current`.

Every step carries a request id (the caller's, or a generated one) stored with the
record; that is how a retry is recognised, and how the engine recognises its own
commit when a store reply was lost.

Replica independence: the commit is a compare-and-set on the record's seq and
incarnation, so two engines (two processes) can never both advance a session from
the same seq. A step that loses the compare-and-set is retried: it goes back to the
front of the batcher queue (its session's later steps keep waiting), is reloaded
and re-judged by the rules above (so a step with `seq` then fails with
`SeqConflict`, and one without `seq` applies on top of the winner's state). After
`max_cas_retries` lost rounds it fails with `ConcurrentUpdate` (ABORTED), unapplied.

If the store fails, the requests of that batch that would have written fail with
`StoreUnavailable` and nothing is half-written (the commit is one atomic script).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from rnnserve.core import StepFunction, StepSignature, TensorSpec

from .batcher import RETRY, DynamicBatcher, Request, Retry
from .errors import (
    ConcurrentUpdate,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ModelNotFound,
    RnnserveError,
    SeqConflict,
    SessionNotFound,
    ShuttingDown,
)
from .metrics import RunnerMetrics, session_ended
from .record import (
    RecordCodec,
    RecordView,
    SessionRecord,
    cas_token,
    new_incarnation,
    read_header,
)
from .store import Commit, StateStore, session_key

__all__ = [
    "ModelRunner",
    "RunnerConfig",
    "RunnerStats",
    "SequenceResult",
    "SessionEngine",
    "SessionInfo",
    "StepResult",
]

logger = logging.getLogger(__name__)

Tensors = Sequence[Any] | Mapping[str, Any]
MAX_REQUEST_ID_LENGTH = 256


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """How one model version is served (from the model repository's config).

    - `max_batch_size`, `max_queue_delay_s`, `max_queue_size`, `max_batches_in_flight`,
      `idle_dispatch`: the `DynamicBatcher`'s limits (a batch waits up to the delay for
      more steps only while another batch is running, with `idle_dispatch`).
    - `compute_threads`: executor threads for the model step (1: batches in flight
      overlap store I/O with compute, but never run two steps at once).
    - `idle_timeout_s`: a session's TTL in the store, refreshed by every step.
    - `states_float16`: store floating states as float16 (half the bytes).
    - `max_cas_retries`: how often a step that lost the compare-and-set to another
      writer is reloaded and retried before it fails with `ConcurrentUpdate`.
    - `max_sequence_length`: the most steps one `run_sequence` may take.
    - `reject_nonfinite`: floating inputs, constants and initial states holding NaN or
      +-Inf are INVALID_ARGUMENT (one such step would poison the session's state for
      good); False lets them through to the model.
    """

    max_batch_size: int = 256
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 8192
    max_batches_in_flight: int = 2
    idle_dispatch: bool = True
    compute_threads: int = 1
    idle_timeout_s: float = 3600.0
    states_float16: bool = False
    max_cas_retries: int = 16
    max_sequence_length: int = 100_000
    reject_nonfinite: bool = True


@dataclass
class RunnerStats:
    """Counters of one runner (tests read them; metrics will)."""

    applied: int = 0
    replayed: int = 0
    seq_conflicts: int = 0
    cas_retries: int = 0
    store_errors: int = 0


@dataclass(frozen=True)
class SessionInfo:
    model: str
    version: str
    session_id: str
    seq: int
    created_at: float
    updated_at: float
    expires_in_s: float | None = None


@dataclass(frozen=True)
class StepResult:
    """One step's outputs (one sample each, signature order) and the seq it left."""

    outputs: list[np.ndarray]
    seq: int
    replayed: bool = False


@dataclass(frozen=True)
class SequenceResult:
    """All outputs of a `run_sequence` (time-major: `(T, ...)` each) and the final seq."""

    outputs: list[np.ndarray]
    seq: int


@dataclass(eq=False, slots=True)
class _Step:
    session_id: str
    inputs: list[np.ndarray]
    seq: int | None
    request_id: str
    after: asyncio.Future[StepResult] | None = None  # the previous step of a run_sequence
    request_id_bytes: bytes = field(default=b"")


def _check_tensors(
    values: Tensors | None, specs: Sequence[TensorSpec], role: str, *, leading: tuple[int, ...] = ()
) -> list[np.ndarray]:
    """Arrays in signature order, shaped `leading + spec.shape`, in the spec's dtype."""
    if values is None:
        values = []
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - {s.name for s in specs})
        if unknown:
            raise InvalidArgument(
                f"unknown {role} tensor(s) {unknown}; expected {[s.name for s in specs]}"
            )
        missing = [s.name for s in specs if s.name not in values]
        if missing:
            raise InvalidArgument(f"missing {role} tensor(s) {missing}")
        values = [values[s.name] for s in specs]
    if len(values) != len(specs):
        raise InvalidArgument(
            f"expected {len(specs)} {role} tensor(s) {[s.name for s in specs]}, got {len(values)}"
        )
    checked = []
    for spec, value in zip(specs, values, strict=True):
        array = np.asarray(value)
        dtype = spec.numpy_dtype
        shape = (*leading, *spec.shape)
        if array.shape != shape:
            raise InvalidArgument(f"{role} {spec.name!r}: shape {array.shape}, expected {shape}")
        if array.dtype == dtype and array.flags.c_contiguous:
            checked.append(array)  # the common case: a decoded wire tensor
            continue
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, "same_kind"):
            raise InvalidArgument(f"{role} {spec.name!r}: dtype {array.dtype} is not {dtype}")
        # np.asarray keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
        checked.append(np.asarray(array, dtype=dtype, order="C"))
    return checked


def _check_finite(arrays: Sequence[np.ndarray], specs: Sequence[TensorSpec], role: str) -> None:
    for spec, array in zip(specs, arrays, strict=True):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidArgument(
                f"{role} {spec.name!r} holds NaN or infinite values (nonfinite_inputs=reject)"
            )


class ModelRunner:
    """One model version being served: its step function, codec, batcher and executor."""

    def __init__(
        self,
        name: str,
        version: str,
        step_fn: StepFunction,
        store: StateStore,
        config: RunnerConfig,
    ) -> None:
        self.name = name
        self.version = version
        self.step_fn = step_fn
        self.signature: StepSignature = step_fn.signature
        self.config = config
        self.stats = RunnerStats()
        self.metrics = RunnerMetrics(name, version, queue_capacity=config.max_queue_size)
        self._store = store
        sig = self.signature
        self.codec = RecordCodec(
            model=name,
            version=version,
            outputs=sig.outputs,
            constants=sig.constants,
            states=sig.states,
            states_float16=config.states_float16,
        )
        self._zero_outputs = self.codec.output_rows(
            [np.zeros((1, *s.shape), s.numpy_dtype) for s in sig.outputs], 1
        )[0]
        self._initial_states = self.codec.state_rows(sig.initial_states(1), 1)[0]
        # One compute thread by default: batches in flight overlap their store I/O
        # with the other's compute; two model steps at once would only fight over
        # the cores (and starve the event loop) on a small machine.
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, config.compute_threads),
            thread_name_prefix=f"rnnserve-{name}-{version}",
        )
        self.batcher: DynamicBatcher[_Step, StepResult] = DynamicBatcher(
            self._handle,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_s,
            max_queue_size=config.max_queue_size,
            max_batches_in_flight=config.max_batches_in_flight,
            idle_dispatch=config.idle_dispatch,
            on_batch=self._after_batch,
            name=f"{name}:{version}",
        )

    def _after_batch(self, size: int, seconds: float) -> None:
        self.metrics.batcher_state(self.batcher.queued, self.batcher.active_keys)

    def _timed_step(self, *arrays: Any) -> Any:
        # In the executor: the model step alone, not its wait for the compute thread.
        started = time.perf_counter()
        try:
            return self.step_fn(*arrays)
        finally:
            self.metrics.compute.observe(time.perf_counter() - started)

    async def aclose(self) -> None:
        await self.batcher.aclose()
        self._executor.shutdown(wait=True)

    # -- records outside the batch path -------------------------------------------
    def new_record(
        self,
        *,
        constants: list[np.ndarray],
        states: list[np.ndarray] | None,
        now: float,
        created_at: float | None = None,
    ) -> bytes:
        codec = self.codec
        return codec.encode(
            seq=0,
            incarnation=new_incarnation(),
            created_at=now if created_at is None else created_at,
            updated_at=now,
            request_id=b"",
            outputs=self._zero_outputs,
            constants=codec.constant_rows([c[None] for c in constants], 1)[0],
            states=(
                self._initial_states
                if states is None
                else codec.state_rows([s[None] for s in states], 1)[0]
            ),
        )

    # -- the batch handler ----------------------------------------------------------
    def _nonfinite_rows(self, stacked: list[np.ndarray]) -> dict[int, BaseException]:
        """Rows of the batch whose float inputs hold NaN or +-Inf, with their error."""
        refused: dict[int, BaseException] = {}
        for spec, x in zip(self.signature.inputs, stacked, strict=True):
            if x.dtype.kind != "f" or np.isfinite(x).all():
                continue
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            for i in np.flatnonzero(bad).tolist():
                refused.setdefault(
                    i,
                    InvalidArgument(
                        f"input {spec.name!r} holds NaN or infinite values "
                        "(nonfinite_inputs=reject)"
                    ),
                )
        return refused

    async def _handle(
        self, batch: list[Request[_Step, StepResult]]
    ) -> list[StepResult | BaseException | Retry]:
        codec = self.codec
        stats = self.stats
        metrics = self.metrics
        keys = cast(list[str], [r.key for r in batch])
        started = time.perf_counter()
        for request in batch:
            if not request.attempts:
                metrics.queue.observe(started - request.enqueued_at)
        metrics.batch_size.observe(len(batch))
        results: list[StepResult | BaseException | Retry] = [RETRY] * len(batch)
        stacked = [
            np.stack([r.payload.inputs[j] for r in batch])
            for j in range(len(self.signature.inputs))
        ]
        refused = self._nonfinite_rows(stacked) if self.config.reject_nonfinite else {}
        for i, error in refused.items():
            results[i] = error
        try:
            raws = await self._store.load_many(keys)
        except RnnserveError:
            stats.store_errors += 1
            metrics.store_errors.inc()
            raise
        metrics.state_load.observe(time.perf_counter() - started)
        todo: list[int] = []
        views: list[RecordView] = []
        for i, (request, raw) in enumerate(zip(batch, raws, strict=True)):
            if i in refused:
                continue
            step = request.payload
            after = step.after
            if (
                after is not None
                and after.done()
                and (after.cancelled() or after.exception() is not None)
            ):
                results[i] = FailedPrecondition("an earlier step of this sequence failed")
                continue
            if raw is None:
                metrics.expired.inc()
                results[i] = SessionNotFound(
                    f"session {step.session_id!r} of model {self.name!r} does not exist "
                    "(never started, ended, or expired)"
                )
                continue
            try:
                view = codec.view(raw)
            except RnnserveError as exc:
                results[i] = exc
                continue
            if step.request_id == view.last_request_id and (
                step.seq is None or step.seq == view.seq - 1
            ):
                stats.replayed += 1
                metrics.replayed.inc()
                results[i] = StepResult(
                    codec.unstack_outputs([view.outputs])[0], view.seq, replayed=True
                )
            elif step.seq is None or step.seq == view.seq:
                todo.append(i)
                views.append(view)
            else:
                stats.seq_conflicts += 1
                metrics.seq_conflicts.inc()
                results[i] = SeqConflict(
                    f"session {step.session_id!r} is at seq {view.seq}; "
                    f"the step expected seq {step.seq}",
                    current_seq=view.seq,
                )
        if not todo:
            return results
        n = len(todo)
        steps = [batch[i].payload for i in todo]
        inputs = stacked if n == len(batch) else [x[todo] for x in stacked]
        constants = codec.stack_constants(views)
        states = codec.stack_states(views)
        loop = asyncio.get_running_loop()
        try:
            outputs, new_states = await loop.run_in_executor(
                self._executor, self._timed_step, inputs, constants, states
            )
        except Exception as exc:
            logger.exception("model %s:%s step failed", self.name, self.version)
            error = Internal(f"model {self.name!r} version {self.version!r} step failed")
            error.__cause__ = exc
            for i in todo:  # the replays and conflicts of this batch still stand
                results[i] = error
            return results
        output_rows = codec.output_rows(outputs, n)
        state_rows = codec.state_rows(new_states, n)
        now = time.time()
        ttl = self.config.idle_timeout_s
        commits = [
            Commit(
                keys[i],
                cas_token(view.seq, view.incarnation),
                codec.encode(
                    seq=view.seq + 1,
                    incarnation=view.incarnation,
                    created_at=view.created_at,
                    updated_at=now,
                    request_id=step.request_id_bytes,
                    outputs=out_row,
                    constants=view.constants,
                    states=state_row,
                ),
                ttl,
            )
            for i, step, view, out_row, state_row in zip(
                todo, steps, views, output_rows, state_rows, strict=True
            )
        ]
        committing = time.perf_counter()
        try:
            applied = await self._store.commit_many(commits)
        except RnnserveError as exc:
            stats.store_errors += 1
            metrics.store_errors.inc()
            for i in todo:
                results[i] = exc
            return results
        metrics.state_commit.observe(time.perf_counter() - committing)
        for k, (i, view, ok) in enumerate(zip(todo, views, applied, strict=True)):
            if ok:
                stats.applied += 1
                metrics.steps.inc()
                results[i] = StepResult([o[k] for o in outputs], view.seq + 1)
            elif batch[i].attempts < self.config.max_cas_retries:
                stats.cas_retries += 1
                metrics.cas_retries.inc()
                results[i] = RETRY
            else:
                results[i] = ConcurrentUpdate(
                    f"session {batch[i].payload.session_id!r} was changed by another writer "
                    f"{batch[i].attempts + 1} times while this step ran; not applied"
                )
        return results


class SessionEngine:
    """Sessions of the loaded models: start, step, run_sequence, end, reset, get, export/import.

    Owns its store (closed by `aclose`). Models are loaded with `load_model`; a request
    names the model and optionally a version (default: the version loaded last).
    `namespace` (default: the engine's) is the key prefix that separates callers.
    """

    def __init__(
        self, store: StateStore, *, namespace: str = "default", run_sequence_window: int = 2
    ) -> None:
        self.store = store
        self.namespace = namespace
        self._runners: dict[str, dict[str, ModelRunner]] = {}
        self._default_version: dict[str, str] = {}
        self._request_ids = itertools.count()
        self._request_prefix = f"~{secrets.token_hex(6)}-"
        self._window = max(1, run_sequence_window)
        self._closing = False
        session_key(namespace, "m", "s")  # validates the namespace

    # -- lifecycle ------------------------------------------------------------------
    async def __aenter__(self) -> SessionEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop intake, drain every runner's queued steps, close the store."""
        self._closing = True
        runners = [r for versions in self._runners.values() for r in versions.values()]
        self._runners.clear()
        await asyncio.gather(*(r.aclose() for r in runners))
        await self.store.aclose()

    def load_model(
        self,
        name: str,
        version: str,
        step_fn: StepFunction,
        *,
        config: RunnerConfig | None = None,
        default: bool = True,
    ) -> ModelRunner:
        """Serve `step_fn` as `name` version `version` (warm it first: `step_fn.warmup()`)."""
        session_key(self.namespace, name, "s")  # validates the model name
        if not version:
            raise InvalidArgument("a model version must be non-empty")
        versions = self._runners.setdefault(name, {})
        if version in versions:
            raise InvalidArgument(f"model {name!r} version {version!r} is already loaded")
        runner = ModelRunner(name, version, step_fn, self.store, config or RunnerConfig())
        versions[version] = runner
        if default or name not in self._default_version:
            self._default_version[name] = version
        return runner

    async def unload_model(self, name: str, version: str) -> None:
        runner = self.runner(name, version)
        del self._runners[name][version]
        if not self._runners[name]:
            del self._runners[name]
            del self._default_version[name]
        elif self._default_version[name] == version:
            self._default_version[name] = next(reversed(self._runners[name]))
        await runner.aclose()

    def set_default_version(self, name: str, version: str) -> None:
        """The version used when a request names none (the repository picks the highest)."""
        self.runner(name, version)
        self._default_version[name] = version

    def runner(self, model: str, version: str | None = None) -> ModelRunner:
        if self._closing:
            raise ShuttingDown("the engine is shutting down")
        versions = self._runners.get(model)
        if not versions:
            raise ModelNotFound(f"model {model!r} is not loaded")
        if version is None:
            version = self._default_version[model]
        runner = versions.get(version)
        if runner is None:
            raise ModelNotFound(
                f"model {model!r} has no version {version!r} loaded (loaded: {sorted(versions)})"
            )
        return runner

    def _key(self, model: str, session_id: str, namespace: str | None) -> str:
        return session_key(self.namespace if namespace is None else namespace, model, session_id)

    def _request_id(self, request_id: str | None) -> str:
        if request_id is None:
            return f"{self._request_prefix}{next(self._request_ids)}"
        if not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument(
                f"request id must be 1 to {MAX_REQUEST_ID_LENGTH} characters, got {len(request_id)}"
            )
        return request_id

    # -- sessions ---------------------------------------------------------------------
    async def start(
        self,
        model: str,
        session_id: str,
        *,
        version: str | None = None,
        constants: Tensors | None = None,
        initial_states: Tensors | None = None,
        namespace: str | None = None,
    ) -> SessionInfo:
        """Create the session at seq 0 (replacing any session of that id).

        `constants` (required if the model has any) are fed to every step;
        `initial_states` default to the model's state initializers.
        """
        runner = self.runner(model, version)
        key = self._key(model, session_id, namespace)
        sig = runner.signature
        consts = _check_tensors(constants, sig.constants, "constant")
        states = (
            None if initial_states is None else _check_tensors(initial_states, sig.states, "state")
        )
        if runner.config.reject_nonfinite:
            _check_finite(consts, sig.constants, "constant")
            if states is not None:
                _check_finite(states, sig.states, "state")
        now = time.time()
        raw = runner.new_record(constants=consts, states=states, now=now)
        await self.store.put(key, raw, runner.config.idle_timeout_s)
        runner.metrics.sessions_started.inc()
        return SessionInfo(
            model, runner.version, session_id, 0, now, now, runner.config.idle_timeout_s
        )

    def check_inputs(
        self, model: str, inputs: Tensors, *, version: str | None = None
    ) -> list[np.ndarray]:
        """One step's inputs checked as `step` checks them (names, dtypes, shapes and the
        nonfinite policy), for protocols that must refuse a step before they change
        anything else, such as a KServe request that also starts its sequence."""
        runner = self.runner(model, version)
        arrays = _check_tensors(inputs, runner.signature.inputs, "input")
        if runner.config.reject_nonfinite:
            _check_finite(arrays, runner.signature.inputs, "input")
        return arrays

    async def step(
        self,
        model: str,
        session_id: str,
        inputs: Tensors,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        version: str | None = None,
        namespace: str | None = None,
    ) -> StepResult:
        """One timestep: `inputs` are one sample per signature input (no batch axis).

        The step reaches the batcher before this coroutine first suspends, so steps
        started in some order (tasks created in that order) are applied in that order.
        """
        return await self.submit_step(
            model,
            session_id,
            inputs,
            seq=seq,
            request_id=request_id,
            version=version,
            namespace=namespace,
        )

    def submit_step(
        self,
        model: str,
        session_id: str,
        inputs: Tensors,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        version: str | None = None,
        namespace: str | None = None,
    ) -> asyncio.Future[StepResult]:
        """`step` without the coroutine: checks the step and queues it now (raising
        what `step` raises for a bad request), and gives the future of its result.
        Steps submitted in some order are applied in that order; cancelling the
        future drops the step if it is not batched yet. Call it on the event loop."""
        runner = self.runner(model, version)
        key = self._key(model, session_id, namespace)
        # The nonfinite policy is applied per batch, in one vectorized pass (`_handle`).
        arrays = _check_tensors(inputs, runner.signature.inputs, "input")
        if seq is not None and seq < 0:
            raise InvalidArgument(f"seq must be >= 0, got {seq}")
        rid = self._request_id(request_id)
        step = _Step(session_id, arrays, seq, rid, None, rid.encode())
        return runner.batcher.submit(key, step)

    async def run_sequence(
        self,
        model: str,
        session_id: str,
        inputs: Tensors,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        version: str | None = None,
        namespace: str | None = None,
    ) -> SequenceResult:
        """Many steps of one session: `inputs` are time-major, `(T, ...)` each.

        The steps run one per batch, in order, alongside other sessions' steps (the
        next step waits in the batcher while the current one runs). With `seq`, step t
        expects `seq + t`; with `request_id`, step t gets request id `f"{request_id}#{t}"`.
        Steps commit one by one: if one fails, the later ones are not applied and the
        error has a note saying how many were; a retry then fails with `SeqConflict`
        naming the seq to resume from.
        """
        results = [
            result
            async for _, result in self.iter_sequence(
                model,
                session_id,
                inputs,
                seq=seq,
                request_id=request_id,
                version=version,
                namespace=namespace,
            )
        ]
        outputs = [
            np.stack([r.outputs[j] for r in results]) for j in range(len(results[0].outputs))
        ]
        return SequenceResult(outputs, results[-1].seq)

    async def iter_sequence(
        self,
        model: str,
        session_id: str,
        inputs: Tensors,
        *,
        seq: int | None = None,
        request_id: str | None = None,
        version: str | None = None,
        namespace: str | None = None,
    ) -> AsyncIterator[tuple[int, StepResult]]:
        """`run_sequence` one step at a time: yields `(t, StepResult)` as each step commits.

        Stopping early (closing the iterator) cancels the steps not yet started; the
        step after the last one yielded may already be running (the next step is queued
        while the current one runs), so the session may be one step further than what
        was yielded: `get()` tells its seq.
        """
        runner = self.runner(model, version)
        key = self._key(model, session_id, namespace)
        specs = runner.signature.inputs
        if not specs:
            raise InvalidArgument(f"model {model!r} has no sequence inputs")
        if isinstance(inputs, Mapping):
            first = inputs.get(specs[0].name)
        else:
            first = inputs[0] if len(inputs) else None
        if first is None:  # (a KeyError here was answered INTERNAL)
            _check_tensors(inputs, specs, "input")  # names what is missing or unknown
            raise InvalidArgument(f"missing input tensor(s) {[specs[0].name]}")
        length = int(np.shape(first)[0]) if np.ndim(first) > 0 else 0
        if not 1 <= length <= runner.config.max_sequence_length:
            raise InvalidArgument(
                f"a sequence needs 1 to {runner.config.max_sequence_length} steps, got {length}"
            )
        arrays = _check_tensors(inputs, specs, "input", leading=(length,))
        if runner.config.reject_nonfinite:
            _check_finite(arrays, specs, "input")
        if seq is not None and seq < 0:
            raise InvalidArgument(f"seq must be >= 0, got {seq}")
        base_rid = self._request_id(request_id)
        futures: list[asyncio.Future[StepResult]] = []

        def submit(t: int) -> None:
            rid = f"{base_rid}#{t}"
            step = _Step(
                session_id,
                [a[t] for a in arrays],
                None if seq is None else seq + t,
                rid,
                futures[-1] if futures else None,
                rid.encode(),
            )
            futures.append(runner.batcher.submit(key, step))

        applied = 0
        last_seq: int | None = None
        try:
            for t in range(length):
                try:
                    while len(futures) < min(length, t + self._window):
                        submit(len(futures))
                    result = await futures[t]
                except RnnserveError as exc:
                    at = "" if last_seq is None else f"; session seq now {last_seq}"
                    exc.add_note(f"run_sequence: {applied} of {length} step(s) applied{at}")
                    raise
                applied += 1
                last_seq = result.seq
                yield t, result
        finally:
            for future in futures[applied:]:
                future.cancel()

    async def end(self, model: str, session_id: str, *, namespace: str | None = None) -> bool:
        """Delete the session; True if it existed (ending twice is not an error)."""
        self.runner(model)
        existed = await self.store.delete(self._key(model, session_id, namespace))
        if existed:
            session_ended(model)
        return existed

    async def reset(
        self,
        model: str,
        session_id: str,
        *,
        constants: Tensors | None = None,
        initial_states: Tensors | None = None,
        namespace: str | None = None,
    ) -> SessionInfo:
        """Back to seq 0 with initial (or given) states; constants kept unless given.

        The session keeps its id, creation time and model version; in-flight steps
        prepared against the old state lose their compare-and-set and are re-judged.
        """
        key = self._key(model, session_id, namespace)
        for _ in range(self._max_retries(model)):
            raw = await self.store.get(key)
            if raw is None:
                raise SessionNotFound(f"session {session_id!r} of model {model!r} does not exist")
            version = read_header(raw).version
            runner = self.runner(model, version)
            view = runner.codec.view(raw)
            sig = runner.signature
            consts = (
                runner.codec.stack_constants([view])
                if constants is None
                else [c[None] for c in _check_tensors(constants, sig.constants, "constant")]
            )
            states = (
                None
                if initial_states is None
                else _check_tensors(initial_states, sig.states, "state")
            )
            if runner.config.reject_nonfinite:
                _check_finite([c[0] for c in consts], sig.constants, "constant")
                if states is not None:
                    _check_finite(states, sig.states, "state")
            now = time.time()
            new = runner.new_record(
                constants=[c[0] for c in consts], states=states, now=now, created_at=view.created_at
            )
            token = cas_token(view.seq, view.incarnation)
            ttl = runner.config.idle_timeout_s
            (ok,) = await self.store.commit_many([Commit(key, token, new, ttl)])
            if ok:
                return SessionInfo(model, version, session_id, 0, view.created_at, now, ttl)
        raise ConcurrentUpdate(f"session {session_id!r} kept changing while it was being reset")

    def _max_retries(self, model: str) -> int:
        return self.runner(model).config.max_cas_retries + 1

    async def get(
        self, model: str, session_id: str, *, namespace: str | None = None
    ) -> SessionInfo:
        """The session's seq, model version, timestamps and time left before idle expiry."""
        self.runner(model)
        key = self._key(model, session_id, namespace)
        raw = await self.store.get(key)
        if raw is None:
            raise SessionNotFound(f"session {session_id!r} of model {model!r} does not exist")
        head = read_header(raw)
        return SessionInfo(
            head.model,
            head.version,
            session_id,
            head.seq,
            head.created_at,
            head.updated_at,
            await self.store.ttl(key),
        )

    async def export_state(
        self, model: str, session_id: str, *, namespace: str | None = None
    ) -> SessionRecord:
        """The whole session (states, constants, last outputs, seq) for migration or debugging.

        `SessionRecord.encode()` gives it as portable bytes."""
        self.runner(model)
        raw = await self.store.get(self._key(model, session_id, namespace))
        if raw is None:
            raise SessionNotFound(f"session {session_id!r} of model {model!r} does not exist")
        return SessionRecord.decode(raw)

    async def import_state(
        self,
        model: str,
        session_id: str,
        record: SessionRecord | bytes,
        *,
        namespace: str | None = None,
    ) -> SessionInfo:
        """Write an exported session under `session_id` (replacing any), keeping its seq,
        last request id and outputs, so exactly-once retries carry over."""
        if isinstance(record, bytes):
            record = SessionRecord.decode(record)
        if record.model != model:
            raise InvalidArgument(f"record is of model {record.model!r}, not {model!r}")
        runner = self.runner(model, record.version)
        now = time.time()
        fresh = SessionRecord(
            model=record.model,
            version=record.version,
            seq=record.seq,
            incarnation=new_incarnation(),
            created_at=record.created_at,
            updated_at=now,
            last_request_id=record.last_request_id,
            last_outputs=record.last_outputs,
            constants=record.constants,
            states=record.states,
        )
        try:
            raw = runner.codec.reencode(fresh)
        except RnnserveError as exc:
            raise InvalidArgument(f"record does not fit the model's signature: {exc}") from exc
        key = self._key(model, session_id, namespace)
        await self.store.put(key, raw, runner.config.idle_timeout_s)
        return SessionInfo(
            model,
            record.version,
            session_id,
            record.seq,
            record.created_at,
            now,
            runner.config.idle_timeout_s,
        )
