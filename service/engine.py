"""`SessionEngine`: the session lifecycle API over the loaded models.

Start, step, step many sessions at once, run a sequence, end, reset, get, export and
import. The engine is the one registry of what is loaded: `load_model` and
`unload_model` change it; `models`, `versions`, `default_version` and `loaded` read it
(the servicers answer ListModels and metadata from them). A model's default version is
its highest (`version_key` order) unless one is pinned with `set_default_version`.

Each loaded model version has a `ModelRunner` (`runner.py`): its compiled
`StepFunction`, a `DynamicBatcher` and the batch path (load, judge, compute, commit),
which also holds the semantics of a step (seq, replays, conflicts, compare-and-set
retries). This module checks requests, builds store keys and hands steps to runners.

Every step carries a request id (the caller's, or a generated one) stored with the
record; that is how a retry is recognised, and how the engine recognises its own
commit when a store reply was lost.

Replica independence: the commit is a compare-and-set on the record's seq and
incarnation, so two engines (two processes) can never both advance a session from
the same seq.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.core import StepFunction, TensorSpec

from .compute import ComputeProcess
from .errors import (
    ConcurrentUpdate,
    InvalidArgument,
    ModelNotFound,
    RnnserveError,
    SessionNotFound,
    ShuttingDown,
)
from .metrics import session_ended
from .record import SessionRecord, new_incarnation, read_header, replace_record
from .runner import (
    ModelRunner,
    RunnerConfig,
    RunnerStats,
    Step,
    StepResult,
    Tensors,
    check_finite,
    check_tensors,
    gather_outputs,
)
from .store import StateStore, check_session_id, key_prefix, session_key

__all__ = [
    "ManyResult",
    "ManySteps",
    "ModelRunner",
    "RunnerConfig",
    "RunnerStats",
    "SequenceResult",
    "SessionEngine",
    "SessionInfo",
    "StepResult",
    "sorted_versions",
    "version_key",
]

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 256


def version_key(version: str) -> tuple[int, int | str]:
    """The order of a model's versions: numbers by value, before any other name."""
    return (0, int(version)) if version.isdigit() else (1, version)


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=version_key)


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
class SequenceResult:
    """All outputs of a `run_sequence` (time-major: `(T, ...)` each) and the final seq."""

    outputs: list[np.ndarray]
    seq: int
    version: str = ""
    output_specs: Sequence[TensorSpec] = ()


@dataclass(frozen=True, eq=False)
class ManyResult:
    """The rows of a `submit_many`, columnar: row k's error (None when it applied or
    was replayed), seq after its step (0 when failed), whether it was a replay, and
    the outputs stacked `(K, ...)` per signature output (zeros in failed rows)."""

    version: str
    output_specs: Sequence[TensorSpec]
    errors: list[BaseException | None]
    seqs: list[int]
    replayed: list[bool]
    outputs: list[np.ndarray]


class ManySteps:
    """The rows of a `submit_many` on their way: `done` resolves once every row is
    settled; then `result()` gives the `ManyResult`. Cancelling `done` cancels the
    rows not yet batched (a closed stream)."""

    __slots__ = ("done", "futures", "refused", "runner")

    def __init__(
        self,
        runner: ModelRunner,
        futures: list[asyncio.Future[StepResult] | None],
        refused: dict[int, BaseException],
        done: asyncio.Future[None],
    ) -> None:
        self.runner = runner
        self.futures = futures
        self.refused = refused
        self.done = done
        done.add_done_callback(self._finished)

    def _finished(self, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            for future in self.futures:
                if future is not None:
                    future.cancel()

    def result(self) -> ManyResult:
        """The outcome of every row (call once `done` has resolved)."""
        n = len(self.futures)
        errors: list[BaseException | None] = [None] * n
        seqs = [0] * n
        replayed = [False] * n
        results: list[StepResult | None] = [None] * n
        for k, future in enumerate(self.futures):
            if future is None:
                errors[k] = self.refused[k]
            elif future.cancelled():
                errors[k] = ShuttingDown("the step was cancelled before it ran")
            elif (error := future.exception()) is not None:
                errors[k] = error
            else:
                result = future.result()
                results[k] = result
                seqs[k] = result.seq
                replayed[k] = result.replayed
        specs = self.runner.output_specs
        return ManyResult(
            self.runner.version, specs, errors, seqs, replayed, gather_outputs(results, specs)
        )


class SessionEngine:
    """Sessions of the loaded models: start, step, run_sequence, end, reset, get, export/import.

    Owns its store (closed by `aclose`). Models are loaded with `load_model`; a request
    names the model and optionally a version (default: `default_version`, the highest
    loaded version unless one is pinned). `namespace` (default: the engine's) is the key
    prefix that separates callers.
    """

    def __init__(
        self, store: StateStore, *, namespace: str = "default", run_sequence_window: int = 2
    ) -> None:
        self.store = store
        self.namespace = namespace
        self._runners: dict[str, dict[str, ModelRunner]] = {}
        self._pinned: dict[str, str] = {}  # versions set by `set_default_version`
        self._default_version: dict[str, str] = {}  # the rule's answer, kept current
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
        self._pinned.clear()
        self._default_version.clear()
        await asyncio.gather(*(r.aclose() for r in runners))
        await self.store.aclose()

    # -- the registry of loaded models --------------------------------------------------
    def load_model(
        self,
        name: str,
        version: str,
        step_fn: StepFunction,
        *,
        config: RunnerConfig | None = None,
        default: bool = False,
        path: Path | None = None,
        load_seconds: float | None = None,
        compute: ComputeProcess | None = None,
    ) -> ModelRunner:
        """Serve `step_fn` as `name` version `version` (warm it first: `step_fn.warmup()`).

        `default=True` pins this version as the model's default (`set_default_version`);
        otherwise the default stays the highest loaded version (or the pinned one).
        `path` and `load_seconds` say where it came from, for those who read the registry.
        """
        session_key(self.namespace, name, "s")  # validates the model name
        if not version:
            raise InvalidArgument("a model version must be non-empty")
        versions = self._runners.setdefault(name, {})
        if version in versions:
            raise InvalidArgument(f"model {name!r} version {version!r} is already loaded")
        runner = ModelRunner(
            name,
            version,
            step_fn,
            self.store,
            config or RunnerConfig(),
            path=path,
            load_seconds=load_seconds,
            compute=compute,
        )
        versions[version] = runner
        if default:
            self._pinned[name] = version
        self._choose_default(name)
        return runner

    async def unload_model(self, name: str, version: str) -> None:
        """Stop serving `name` version `version`: its queued steps finish first. A pin
        on it is dropped (the default goes back to the highest version left)."""
        runner = self.loaded(name, version)
        del self._runners[name][version]
        if not self._runners[name]:
            del self._runners[name]
        if self._pinned.get(name) == version:
            del self._pinned[name]
        self._choose_default(name)
        await runner.aclose()

    def set_default_version(self, name: str, version: str | None) -> None:
        """Pin the version used when a request names none; `None` unpins (the highest
        loaded version again). A pin lasts until that version is unloaded."""
        if version is None:
            self._pinned.pop(name, None)
        else:
            self.loaded(name, version)
            self._pinned[name] = version
        self._choose_default(name)

    def _choose_default(self, name: str) -> None:
        versions = self._runners.get(name)
        if not versions:
            self._default_version.pop(name, None)
            self._pinned.pop(name, None)
            return
        self._default_version[name] = self._pinned.get(name) or max(versions, key=version_key)

    def serves(self, name: str) -> bool:
        """Whether a version of model `name` is loaded (cheap: once per call)."""
        return name in self._runners

    def models(self) -> list[str]:
        """The names of the loaded models, sorted."""
        return sorted(self._runners)

    def versions(self, name: str) -> list[str]:
        """The loaded versions of `name` in `version_key` order (empty if none)."""
        return sorted_versions(self._runners.get(name, ()))

    def default_version(self, name: str) -> str:
        """The version a request that names none gets: the pinned one, else the highest."""
        version = self._default_version.get(name)
        if version is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return version

    def loaded(self, name: str, version: str | None = None) -> ModelRunner:
        """The runner of `name` at `version` (default: `default_version`): its signature,
        config, and where it was loaded from. Raises `ModelNotFound`."""
        versions = self._runners.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if version is None:
            version = self._default_version[name]
        runner = versions.get(version)
        if runner is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} loaded (loaded: {self.versions(name)})"
            )
        return runner

    def runner(self, model: str, version: str | None = None) -> ModelRunner:
        """`loaded`, for a session call: refused with `ShuttingDown` once closing."""
        if self._closing:
            raise ShuttingDown("the engine is shutting down")
        return self.loaded(model, version)

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
        consts = check_tensors(constants, sig.constants, "constant")
        states = (
            None if initial_states is None else check_tensors(initial_states, sig.states, "state")
        )
        if runner.config.reject_nonfinite:
            check_finite(consts, sig.constants, "constant")
            if states is not None:
                check_finite(states, sig.states, "state")
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
        arrays = check_tensors(inputs, runner.signature.inputs, "input")
        if runner.config.reject_nonfinite:
            check_finite(arrays, runner.signature.inputs, "input")
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
        arrays = check_tensors(inputs, runner.signature.inputs, "input")
        if seq is not None and seq < 0:
            raise InvalidArgument(f"seq must be >= 0, got {seq}")
        rid = self._request_id(request_id)
        step = Step(session_id, arrays, seq, rid, None, rid.encode())
        return runner.batcher.submit(key, step)

    def submit_many(
        self,
        model: str,
        session_ids: Sequence[str],
        inputs: Tensors,
        *,
        seqs: Sequence[int | None] | None = None,
        request_ids: Sequence[str | None] | None = None,
        version: str | None = None,
        namespace: str | None = None,
    ) -> ManySteps:
        """One step of each of K sessions: row k of every input (shaped `(K, ...)`) is
        session `session_ids[k]`'s step, with `seqs[k]` and `request_ids[k]` if given.

        The rows are queued at once, in row order, as K `Step`s would be: each has
        Step's semantics and its own outcome (a bad row never fails the others), and
        two rows of one session are two consecutive steps of it. Raises for what
        makes the whole message unusable (unknown model, inputs that are not K rows
        of the signature's shape, ragged seqs or request ids, a full queue); then
        nothing is queued. Call it on the event loop."""
        runner = self.runner(model, version)
        n = len(session_ids)
        if n == 0:
            raise InvalidArgument("a StepMany message needs at least one row (session id)")
        for role, column in (("seqs", seqs), ("request ids", request_ids)):
            if column and len(column) != n:
                raise InvalidArgument(
                    f"{len(column)} {role} for {n} rows: give none or one per row"
                )
        specs = runner.signature.inputs
        if isinstance(inputs, Mapping):
            for name, value in inputs.items():
                count = np.shape(value)[0] if np.ndim(value) else 0
                if count != n:
                    raise InvalidArgument(
                        f"input {name!r} has {count} rows; the message has {n} session ids"
                    )
        arrays = check_tensors(inputs, specs, "input", leading=(n,))
        prefix = key_prefix(self.namespace if namespace is None else namespace, model)
        refused: dict[int, BaseException] = {}
        items: list[tuple[str, Step]] = []
        rows: list[int] = []
        for k, session_id in enumerate(session_ids):
            seq = seqs[k] if seqs else None
            given = request_ids[k] if request_ids else None
            try:
                check_session_id(session_id)
                if seq is not None and seq < 0:
                    raise InvalidArgument(f"seq must be >= 0, got {seq}")
                rid = self._request_id(given or None)
            except RnnserveError as exc:
                refused[k] = exc
                continue
            step = Step(session_id, [], seq, rid, None, rid.encode(), arrays, k)
            items.append((prefix + session_id, step))
            rows.append(k)
        queued, group = runner.batcher.submit_many(items)
        futures: list[asyncio.Future[StepResult] | None] = [None] * n
        for k, future in zip(rows, queued, strict=True):
            futures[k] = future
        return ManySteps(runner, futures, refused, group.done)

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
        last = results[-1]
        return SequenceResult(outputs, last.seq, last.version, last.output_specs)

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
            check_tensors(inputs, specs, "input")  # names what is missing or unknown
            raise InvalidArgument(f"missing input tensor(s) {[specs[0].name]}")
        length = int(np.shape(first)[0]) if np.ndim(first) > 0 else 0
        if not 1 <= length <= runner.config.max_sequence_length:
            raise InvalidArgument(
                f"a sequence needs 1 to {runner.config.max_sequence_length} steps, got {length}"
            )
        arrays = check_tensors(inputs, specs, "input", leading=(length,))
        if runner.config.reject_nonfinite:
            check_finite(arrays, specs, "input")
        if seq is not None and seq < 0:
            raise InvalidArgument(f"seq must be >= 0, got {seq}")
        base_rid = self._request_id(request_id)
        futures: list[asyncio.Future[StepResult]] = []

        def submit(t: int) -> None:
            rid = f"{base_rid}#{t}"
            step = Step(
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
                else [c[None] for c in check_tensors(constants, sig.constants, "constant")]
            )
            states = (
                None
                if initial_states is None
                else check_tensors(initial_states, sig.states, "state")
            )
            if runner.config.reject_nonfinite:
                check_finite([c[0] for c in consts], sig.constants, "constant")
                if states is not None:
                    check_finite(states, sig.states, "state")
            now = time.time()
            new = runner.new_record(
                constants=[c[0] for c in consts], states=states, now=now, created_at=view.created_at
            )
            ttl = runner.config.idle_timeout_s
            (ok,) = await self.store.commit_many([replace_record(key, view, new, ttl)])
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
