"""`ModelRunner`: the batch path of one served model version.

A step travels::

    SessionEngine.submit_step / submit_many -> DynamicBatcher (one step per session
    per batch, in order) -> ModelRunner._handle(batch):
        _load     store.load_many(keys)           one round trip
        _judge    record views; replay / conflict / apply, per row
        _compute  stacked states, the model step (executor thread or compute process)
        _commit   new records, store.commit_many   one round trip, CAS per session
    -> each caller's future (a `StepResult` that points into the batch's outputs)

Semantics of a step on a session whose record is at `current` seq:

- `seq is None`: applies in arrival order.
- `seq == current`: applies; the reply carries `current + 1`.
- `seq == current - 1` and the same request id as the step that made `current`: a
  retry; the stored reply (last outputs) is returned and nothing changes.
  (A step without `seq` but with the last step's request id is treated the same.)
- `seq > current`: `SessionRolledBack` naming the missing steps (the client was told
  of steps the store does not have: a commit lost in a Redis failover).
- otherwise: `SeqConflict` naming `current`.

A step that loses the compare-and-set to another writer goes back to the front of the
batcher queue (`RETRY`), is reloaded and re-judged; after `max_cas_retries` lost rounds
it fails with `ConcurrentUpdate` (ABORTED), unapplied. If the store fails, the steps of
that batch that would have written fail with `StoreUnavailable` and nothing is
half-written (a commit is one atomic script).

Everything here works on whole batches: one stack per input, one vectorized
nonfinite check, one stack of states and constants from the records' bytes, one
encode of the output and state rows; per row there is a record view, a judgement,
a record encode and the caller's future.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from rnnserve.core import StepFunction, StepSignature, TensorSpec

from . import tracing
from .batcher import RETRY, DynamicBatcher, Request, Retry
from .compute import ComputeProcess
from .errors import (
    ConcurrentUpdate,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PartialStoreFailure,
    RnnserveError,
    SeqConflict,
    SessionNotFound,
    SessionRolledBack,
)
from .metrics import RunnerMetrics
from .record import RecordCodec, RecordView, new_incarnation, replace_record
from .store import Commit, StateStore

__all__ = [
    "ModelRunner",
    "RunnerConfig",
    "RunnerStats",
    "StepResult",
    "Tensors",
    "check_finite",
    "check_tensors",
    "gather_outputs",
]

logger = logging.getLogger(__name__)

Tensors = Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """How one model version is served (from the model repository's config).

    - `max_batch_size`, `max_queue_delay_s`, `max_queue_size`, `max_batches_in_flight`,
      `idle_dispatch`: the `DynamicBatcher`'s limits (with `idle_dispatch` a batch waits
      up to the delay for more steps only while another batch is running or a session
      that stepped within the last second has nothing queued: its step is on its way).
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
    - `metadata`: free-form strings about the model (config.yaml's `metadata:`), sent
      with its signature; e.g. the demo model's `vocabulary` (its characters in token
      order), which `rnnserve client generate` reads.
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
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunnerStats:
    """Counters of one runner (tests read them; metrics will)."""

    applied: int = 0
    replayed: int = 0
    seq_conflicts: int = 0
    cas_retries: int = 0
    store_errors: int = 0


class StepResult:
    """One step's outcome: the seq it left the session at, whether it was a replay,
    the model version and output specs that produced it, and its outputs (one sample
    per signature output, no batch axis).

    The outputs are row `row` of the batch's stacked outputs (`batch_outputs`), shared
    by every step of that batch: nothing is copied per step until `outputs` is read,
    and `gather_outputs` turns many results back into stacked arrays with one take
    per batch.
    """

    __slots__ = ("batch_outputs", "output_specs", "replayed", "row", "seq", "version")

    def __init__(
        self,
        batch_outputs: Sequence[np.ndarray],
        row: int,
        seq: int,
        *,
        replayed: bool = False,
        version: str = "",
        output_specs: Sequence[TensorSpec] = (),
    ) -> None:
        self.batch_outputs = batch_outputs
        self.row = row
        self.seq = seq
        self.replayed = replayed
        self.version = version
        self.output_specs = output_specs

    @property
    def outputs(self) -> list[np.ndarray]:
        row = self.row
        return [o[row] for o in self.batch_outputs]

    def __repr__(self) -> str:
        return f"StepResult(seq={self.seq}, replayed={self.replayed}, version={self.version!r})"


def gather_outputs(
    results: Sequence[StepResult | None], specs: Sequence[TensorSpec]
) -> list[np.ndarray]:
    """Stacked `(len(results), ...)` outputs; rows without a result are zeros.

    Results of one batch are taken with one fancy index per output (the common case:
    a many-session message whose rows ran in one or two batches)."""
    n = len(results)
    out = [np.zeros((n, *s.shape), s.numpy_dtype) for s in specs]
    groups: dict[int, tuple[Sequence[np.ndarray], list[int], list[int]]] = {}
    for k, result in enumerate(results):
        if result is None:
            continue
        key = id(result.batch_outputs)
        group = groups.get(key)
        if group is None:
            group = groups[key] = (result.batch_outputs, [], [])
        group[1].append(k)
        group[2].append(result.row)
    for batch, rows, taken in groups.values():
        for target, source in zip(out, batch, strict=True):
            target[rows] = source[taken]
    return out


@dataclass(eq=False, slots=True)
class Step:
    """One step of one session, as the batcher carries it: its inputs one sample each,
    or (a row of a many-session message) row `row` of the batch-first `block`."""

    session_id: str
    inputs: list[np.ndarray]
    seq: int | None
    request_id: str
    after: asyncio.Future[StepResult] | None = None  # the previous step of a run_sequence
    request_id_bytes: bytes = field(default=b"")
    block: list[np.ndarray] | None = None
    row: int = 0

    def input(self, j: int) -> np.ndarray:
        return self.inputs[j] if self.block is None else self.block[j][self.row]


def stack_inputs(steps: Sequence[Step], n_inputs: int) -> list[np.ndarray]:
    """The steps' inputs batch-first: a slice (or one take) of the block when every
    step is a row of the same many-session message, else one stack per input."""
    block = steps[0].block
    if block is not None and all(s.block is block for s in steps):
        first, count = steps[0].row, len(steps)
        if steps[-1].row == first + count - 1 and all(
            s.row == first + k for k, s in enumerate(steps)
        ):
            return [a[first : first + count] for a in block]
        rows = [s.row for s in steps]
        return [a[rows] for a in block]
    return [np.stack([s.input(j) for s in steps]) for j in range(n_inputs)]


def check_tensors(
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


def check_finite(arrays: Sequence[np.ndarray], specs: Sequence[TensorSpec], role: str) -> None:
    for spec, array in zip(specs, arrays, strict=True):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidArgument(
                f"{role} {spec.name!r} holds NaN or infinite values (nonfinite_inputs=reject)"
            )


def nonfinite_rows(
    stacked: Sequence[np.ndarray], specs: Sequence[TensorSpec]
) -> dict[int, BaseException]:
    """Rows of batch-first arrays whose float values hold NaN or +-Inf, with their error."""
    refused: dict[int, BaseException] = {}
    for spec, x in zip(specs, stacked, strict=True):
        if x.dtype.kind != "f" or np.isfinite(x).all():
            continue
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        for i in np.flatnonzero(bad).tolist():
            refused.setdefault(
                i,
                InvalidArgument(
                    f"input {spec.name!r} holds NaN or infinite values (nonfinite_inputs=reject)"
                ),
            )
    return refused


Results = list[StepResult | BaseException | Retry]


class ModelRunner:
    """One model version being served: its step function, codec, batcher and executor,
    and what the engine's registry tells about it (signature, config, the folder it was
    loaded from and how long that took, when a loader says so)."""

    def __init__(
        self,
        name: str,
        version: str,
        step_fn: StepFunction,
        store: StateStore,
        config: RunnerConfig,
        *,
        path: Path | None = None,
        load_seconds: float | None = None,
        compute: ComputeProcess | None = None,
    ) -> None:
        self.name = name
        self.compute_process = compute
        self.version = version
        self.step_fn = step_fn
        self.signature: StepSignature = step_fn.signature
        self.config = config
        self.path = path
        self.load_seconds = load_seconds
        self.stats = RunnerStats()
        self.metrics = RunnerMetrics(name, version, queue_capacity=config.max_queue_size)
        self._store = store
        sig = self.signature
        self.output_specs = tuple(sig.outputs)
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
        self.batcher: DynamicBatcher[Step, StepResult] = DynamicBatcher(
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
        if self.compute_process is not None:
            await self.compute_process.aclose()

    def result(self, batch_outputs: Sequence[np.ndarray], row: int, seq: int) -> StepResult:
        return StepResult(
            batch_outputs, row, seq, version=self.version, output_specs=self.output_specs
        )

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

    # -- the batch path -------------------------------------------------------------
    async def _handle(self, batch: list[Request[Step, StepResult]]) -> Results:
        metrics = self.metrics
        started = time.perf_counter()
        for request in batch:
            if not request.attempts:
                metrics.queue.observe(started - request.enqueued_at)
        metrics.batch_size.observe(len(batch))
        results: Results = [RETRY] * len(batch)
        inputs = stack_inputs([r.payload for r in batch], len(self.signature.inputs))
        if self.config.reject_nonfinite:
            for i, refused in nonfinite_rows(inputs, self.signature.inputs).items():
                results[i] = refused
        keys = cast(list[str], [r.key for r in batch])
        ttl = self.config.idle_timeout_s
        with tracing.span("state.load"):
            raws = await self._load(keys, results)
        metrics.state_load.observe(time.perf_counter() - started)
        todo, views, replays = self._judge(batch, raws, results)
        # With --redis-min-replicas-ack, a replay is acknowledged only once its record
        # is known to be on the replicas: it is re-written (compare-and-set on its own
        # token) and waited for along with the batch's commits.
        confirm = (
            [(i, replace_record(keys[i], v, cast(bytes, raws[i]), ttl)) for i, v in replays]
            if replays and self._store.min_replicas_ack > 0
            else []
        )
        if not todo:
            if confirm:
                await self._write(batch, [], confirm, results)
            return results
        if len(todo) != len(batch):
            inputs = [x[todo] for x in inputs]
        try:
            with tracing.span("compute"):
                outputs, new_states = await self._compute(inputs, views)
        except Exception as exc:
            error: BaseException
            if isinstance(exc, RnnserveError):  # e.g. the compute process died: UNAVAILABLE
                logger.error("model %s:%s step failed: %s", self.name, self.version, exc)
                error = exc
            else:
                logger.exception("model %s:%s step failed", self.name, self.version)
                error = Internal(f"model {self.name!r} version {self.version!r} step failed")
                error.__cause__ = exc
            for i in todo:  # the replays and conflicts of this batch still stand
                results[i] = error
            if confirm:
                await self._write(batch, [], confirm, results)
            return results
        await self._commit(batch, keys, todo, views, outputs, new_states, results, confirm)
        return results

    def _store_failed(self) -> None:
        self.stats.store_errors += 1
        self.metrics.store_errors.inc()

    async def _load(self, keys: list[str], results: Results) -> list[bytes | None]:
        """The batch's records. On a Cluster whose node failed, only that node's rows
        fail (their result is the error, their record None); the others go on."""
        try:
            return await self._store.load_many(keys)
        except PartialStoreFailure as exc:
            self._store_failed()
            for i, error in exc.failed.items():
                results[i] = error
            return [
                None if i in exc.failed else cast(bytes | None, r)
                for i, r in enumerate(exc.results)
            ]
        except RnnserveError:
            self._store_failed()
            raise

    def _judge(
        self,
        batch: list[Request[Step, StepResult]],
        raws: list[bytes | None],
        results: Results,
    ) -> tuple[list[int], list[RecordView], list[tuple[int, RecordView]]]:
        """Each step against its session's record: a replay, a conflict, an error, or
        to apply (its index and view returned). Results are written for all but those;
        the replays (index and view) are returned too."""
        codec, stats, metrics = self.codec, self.stats, self.metrics
        todo: list[int] = []
        views: list[RecordView] = []
        replays: list[int] = []
        replay_views: list[RecordView] = []
        for i, (request, raw) in enumerate(zip(batch, raws, strict=True)):
            if results[i] is not RETRY:  # refused before the load (nonfinite)
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
                replays.append(i)
                replay_views.append(view)
            elif step.seq is None or step.seq == view.seq:
                todo.append(i)
                views.append(view)
            elif step.seq > view.seq:
                # The client was told of steps the store does not have: a lost commit.
                stats.seq_conflicts += 1
                metrics.seq_conflicts.inc()
                results[i] = SessionRolledBack(
                    step.session_id, stored_seq=view.seq, requested_seq=step.seq
                )
            else:
                stats.seq_conflicts += 1
                metrics.seq_conflicts.inc()
                results[i] = SeqConflict(
                    f"session {step.session_id!r} is at seq {view.seq}; "
                    f"the step expected seq {step.seq}",
                    current_seq=view.seq,
                    requested_seq=step.seq,
                )
        if replays:
            stats.replayed += len(replays)
            metrics.replayed.inc(len(replays))
            stored = codec.stack_outputs(replay_views)
            for k, (i, view) in enumerate(zip(replays, replay_views, strict=True)):
                result = self.result(stored, k, view.seq)
                result.replayed = True
                results[i] = result
        return todo, views, list(zip(replays, replay_views, strict=True))

    async def _compute(
        self, inputs: list[np.ndarray], views: list[RecordView]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The model step over the rows to apply, in the executor or the compute process
        (never on the event loop)."""
        constants = self.codec.stack_constants(views)
        states = self.codec.stack_states(views)
        if self.compute_process is not None:
            outputs, new_states, seconds = await self.compute_process.run(inputs, constants, states)
            self.metrics.compute.observe(seconds)
            return outputs, new_states
        loop = asyncio.get_running_loop()
        outputs, new_states = await loop.run_in_executor(
            self._executor, self._timed_step, inputs, constants, states
        )
        return list(outputs), list(new_states)

    async def _commit(
        self,
        batch: list[Request[Step, StepResult]],
        keys: list[str],
        todo: list[int],
        views: list[RecordView],
        outputs: list[np.ndarray],
        new_states: list[np.ndarray],
        results: Results,
        confirm: list[tuple[int, Commit]],
    ) -> None:
        """Write the new records (compare-and-set each) and settle the applied rows;
        `confirm`: replays re-written with them (see `_handle`)."""
        codec, stats, metrics = self.codec, self.stats, self.metrics
        n = len(todo)
        output_rows = codec.output_rows(outputs, n)
        state_rows = codec.state_rows(new_states, n)
        now = time.time()
        ttl = self.config.idle_timeout_s
        encode = codec.encode
        commits = [
            replace_record(
                keys[i],
                view,
                encode(
                    seq=view.seq + 1,
                    incarnation=view.incarnation,
                    created_at=view.created_at,
                    updated_at=now,
                    request_id=batch[i].payload.request_id_bytes,
                    outputs=out_row,
                    constants=view.constants,
                    states=state_row,
                ),
                ttl,
            )
            for i, view, out_row, state_row in zip(
                todo, views, output_rows, state_rows, strict=True
            )
        ]
        applied = await self._write(batch, list(zip(todo, commits, strict=True)), confirm, results)
        n_applied = 0
        for k, (i, view, ok) in enumerate(zip(todo, views, applied, strict=True)):
            if ok:
                n_applied += 1
                results[i] = self.result(outputs, k, view.seq + 1)
        stats.applied += n_applied
        metrics.steps.inc(n_applied)

    async def _write(
        self,
        batch: list[Request[Step, StepResult]],
        commits: list[tuple[int, Commit]],
        confirm: list[tuple[int, Commit]],
        results: Results,
    ) -> list[bool]:
        """One `commit_many` of the steps' commits and the replays to confirm. Rows whose
        write failed get the error, rows that lost the compare-and-set are retried (or
        `ConcurrentUpdate`); a confirmed replay keeps its result. Returns, per entry of
        `commits`, whether it applied (its result is then the caller's to write)."""
        rows = [*commits, *confirm]
        failed: dict[int, BaseException] = {}
        committing = time.perf_counter()
        try:
            with tracing.span("state.commit"):
                flags = await self._store.commit_many([c for _, c in rows])
        except PartialStoreFailure as exc:
            self._store_failed()
            failed = dict(exc.failed)
            flags = [bool(flag) for flag in exc.results]
        except RnnserveError as exc:
            self._store_failed()
            failed = dict.fromkeys(range(len(rows)), exc)
            flags = [False] * len(rows)
        else:
            self.metrics.state_commit.observe(time.perf_counter() - committing)
        max_retries = self.config.max_cas_retries
        for k, (i, _) in enumerate(rows):
            if k in failed:
                results[i] = failed[k]
            elif flags[k]:
                continue  # applied: the caller settles it; confirmed: the replay stands
            elif batch[i].attempts < max_retries:
                self.stats.cas_retries += 1
                self.metrics.cas_retries.inc()
                results[i] = RETRY
            else:
                results[i] = ConcurrentUpdate(
                    f"session {batch[i].payload.session_id!r} was changed by another writer "
                    f"{batch[i].attempts + 1} times while this step ran; not applied"
                )
        return [flags[k] and k not in failed for k in range(len(commits))]
