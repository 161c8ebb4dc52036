"""`StepFunction`: one compiled, batched timestep on numpy arrays.

The server batches the steps of many sessions into one call whose batch size
changes from call to call. Compiling per exact size would compile forever;
compiling once with a dynamic batch loses XLA's fixed-shape speed. So batches
are padded up to a power-of-two bucket, each bucket is compiled once (and can
be warmed at load), and the padding is sliced off the results.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from rnnserve.core._container import RecurrentModel
from rnnserve.core._graph import as_list
from rnnserve.core._signature import StepSignature, TensorSpec, make_signature

CompiledStep = Callable[[list[np.ndarray]], list[np.ndarray]]

logger = logging.getLogger(__name__)


def step_signature(model: RecurrentModel) -> StepSignature:
    """The serving view of a `RecurrentModel`: named tensors of one timestep."""
    layout = model.layout
    step_model = model.step_model
    n_seq, n_const = layout.n_sequence_inputs, layout.n_constants
    inputs = step_model.inputs

    def initial_states(batch_size: int) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(s) for s in model.get_initial_state(batch_size)]

    return make_signature(
        inputs=inputs[:n_seq],
        constants=inputs[n_seq : n_seq + n_const],
        states=inputs[n_seq + n_const :],
        outputs=[step_model.outputs[i] for i in layout.tracked_outputs],
        initial_state_fn=initial_states,
    )


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first one >= `max_batch_size`."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def _compiler(
    step_model: keras.Model, specs: Sequence[TensorSpec], jit_compile: bool
) -> Callable[[int], CompiledStep]:
    """`bucket -> compiled step` for the current Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_step(*values: Any) -> list[Any]:
            return as_list(step_model(list(values), training=False))

        def compile_tf(bucket: int) -> CompiledStep:
            # One function per bucket with a fixed signature: each compiles once,
            # and TensorFlow does not warn about "retracing" across buckets.
            signature = [tf.TensorSpec((bucket, *s.shape), s.dtype) for s in specs]
            compiled = tf.function(
                tf_step, input_signature=signature, jit_compile=jit_compile, autograph=False
            )
            # Call the one concrete function directly: `tf.function.__call__` binds and
            # canonicalizes its arguments on every call (Python, under the GIL), which at
            # small batches costs more than the step (docs/benchmarks.md, gRPC section).
            concrete = compiled.get_concrete_function()
            to_tensor = tf.convert_to_tensor

            def run_tf(values: list[np.ndarray]) -> list[np.ndarray]:
                return [t.numpy() for t in concrete(*[to_tensor(v) for v in values])]

            return _direct_tf_call(concrete, specs, bucket, run_tf) or run_tf

        return compile_tf
    if backend == "jax":
        import jax

        def pure(trainable: Any, non_trainable: Any, values: list[Any]) -> list[Any]:
            outputs, _ = step_model.stateless_call(trainable, non_trainable, values, training=False)
            return as_list(outputs)

        jitted = jax.jit(pure) if jit_compile else pure  # jit compiles once per shape

        def run_jax(values: list[np.ndarray]) -> list[np.ndarray]:
            trainable = [v.value for v in step_model.trainable_variables]
            non_trainable = [v.value for v in step_model.non_trainable_variables]
            results: list[Any] = jitted(trainable, non_trainable, values)
            return [np.asarray(o) for o in results]

        return lambda bucket: run_jax

    def run_eager(values: list[np.ndarray]) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(o) for o in as_list(step_model(values, training=False))]

    return lambda bucket: run_eager


class _DirectTFCall:
    """A concrete function's graph executed as one op: see `_direct_tf_call`."""

    __name__ = "direct_tf_call"

    def __init__(self, concrete: Any, specs: Sequence[TensorSpec]) -> None:
        from tensorflow.python.eager import context, execute
        from tensorflow.python.framework import dtypes, ops

        # The atomic function is held on purpose: the runtime drops a function's
        # registration when its Python object is collected.
        self._atomic = concrete._inference_function
        self._name = self._atomic.name.decode("utf-8")
        self._num_outputs = len(self._atomic.function_type.flat_outputs)
        self._captured = list(concrete.captured_inputs)
        self._ctx = context.context()
        options = self._ctx.function_call_options.as_attrs()
        self._attrs = tuple(itertools.chain(*options.items()))
        self._dtypes = [dtypes.as_dtype(s.dtype).as_datatype_enum for s in specs]
        self._eager_tensor = ops.EagerTensor
        self._execute = execute.quick_execute

    def __call__(self, values: list[np.ndarray]) -> list[np.ndarray]:
        device = self._ctx.device_name  # thread-local, as tf.convert_to_tensor reads it
        tensor = self._eager_tensor
        args = [tensor(v, device, d) for v, d in zip(values, self._dtypes, strict=True)]
        args += self._captured
        outputs = self._execute(self._name, self._num_outputs, args, self._attrs, self._ctx)
        return [t.numpy() for t in outputs]


def _direct_tf_call(
    concrete: Any, specs: Sequence[TensorSpec], bucket: int, public: CompiledStep
) -> CompiledStep | None:
    """The step without `ConcreteFunction.__call__`, or None where that is not possible.

    Even a concrete function's `__call__` runs ~150 µs of Python per call under the GIL
    (structured-signature binding, argument conversion through the dispatch registry,
    control-dependency and tape contexts): at the batch sizes of unary serving that is
    more than the step itself, and the event loop waits for that GIL. None of it applies
    to a serving step (flat inputs of known dtypes, eager, no tape, no cancellation), so
    the call goes straight to the op that runs the function, as `AtomicFunction.call_flat`
    does at its end. That uses TensorFlow internals: if any is missing, or the result on
    zeros differs from the public call's, the public call is kept.
    """
    probe = [np.zeros((bucket, *s.shape), dtype=s.dtype) for s in specs]
    try:
        expected = public(probe)  # first: the public call registers the function
        direct = _DirectTFCall(concrete, specs)
        got = direct(probe)
    except Exception:  # anything at all (another TensorFlow): keep the public call
        logger.debug("the direct TensorFlow call is not available here", exc_info=True)
        return None
    same = len(got) == len(expected) and all(
        g.shape == e.shape and g.dtype == e.dtype and np.array_equal(g, e, equal_nan=True)
        for g, e in zip(got, expected, strict=False)
    )
    if not same:
        logger.debug("the direct TensorFlow call differs from the public one: not used")
        return None
    return direct


def set_compute_threads(threads: int) -> bool:
    """Let one model step use at most `threads` CPU threads (TensorFlow's intra-op pool).

    Call it before the first TensorFlow op runs; False if it came too late (the pool
    is fixed once the runtime starts) or the backend is not TensorFlow (JAX reads
    `XLA_FLAGS` at start-up instead). On a small machine a serving process wants its
    event loop to keep a core: with one thread a step costs less CPU in all (no pool
    hand-offs or spinning), though a large batch takes longer.
    """
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # "... cannot be modified after initialization"
        return False
    return True


class StepFunction:
    """`(inputs, constants, states) -> (outputs, new_states)` for any batch size.

    Arguments and results are lists of numpy arrays in signature order, each
    with the batch on axis 0. Batches larger than `max_batch_size` are split.
    Thread-safe: the server calls it from executor threads.
    """

    def __init__(
        self,
        model: RecurrentModel | keras.Model,
        *,
        max_batch_size: int = 256,
        jit_compile: bool = True,
    ) -> None:
        if not isinstance(model, RecurrentModel):
            from rnnserve.core._convert import from_keras

            model = from_keras(model)
        self.model = model
        self.signature = step_signature(model)
        self.buckets = bucket_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        self._layout = model.layout
        self._arg_specs: tuple[TensorSpec, ...] = (
            *self.signature.inputs,
            *self.signature.constants,
            *self.signature.states,
        )
        self._compile = _compiler(model.step_model, self._arg_specs, jit_compile)
        self._compiled: dict[int, CompiledStep] = {}
        self._lock = threading.Lock()

    @property
    def compiled_buckets(self) -> frozenset[int]:
        """Bucket sizes that have run at least once (compiled, for compiled backends)."""
        return frozenset(self._compiled)

    def bucket_for(self, batch_size: int) -> int:
        for size in self.buckets:
            if size >= batch_size:
                return size
        return self.buckets[-1]

    def warmup(self, max_batch_size: int | None = None) -> tuple[int, ...]:
        """Compile every bucket up to `max_batch_size` (default: all) on zeros."""
        limit = self.max_batch_size if max_batch_size is None else max_batch_size
        warmed = []
        for size in self.buckets:
            if size > self.bucket_for(limit):
                break
            zeros = [np.zeros((size, *s.shape), dtype=s.dtype) for s in self._arg_specs]
            self._run_bucket(zeros, size)
            warmed.append(size)
        return tuple(warmed)

    def __call__(
        self,
        inputs: Sequence[np.ndarray],
        constants: Sequence[np.ndarray] = (),
        states: Sequence[np.ndarray] = (),
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        values = self._check([*inputs, *constants, *states])
        batch = values[0].shape[0] if values else 0
        if batch == 0:
            raise ValueError("a step needs a batch of at least one sample")
        limit = self.buckets[-1]
        if batch <= limit:
            raw = self._run_padded(values, batch)
        else:
            parts = [
                self._run_padded(
                    [v[start : start + limit] for v in values], min(limit, batch - start)
                )
                for start in range(0, batch, limit)
            ]
            raw = [np.concatenate(chunk, axis=0) for chunk in zip(*parts, strict=True)]
        layout = self._layout
        return (
            [raw[i] for i in layout.tracked_outputs],
            [raw[i] for i in layout.state_outputs],
        )

    def call_named(
        self, values: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The same step with tensors by signature name: `(outputs, new_states)` dicts."""
        sig = self.signature
        missing = [s.name for s in self._arg_specs if s.name not in values]
        if missing:
            raise ValueError(f"missing tensor(s): {', '.join(missing)}")
        outputs, states = self(
            [values[s.name] for s in sig.inputs],
            [values[s.name] for s in sig.constants],
            [values[s.name] for s in sig.states],
        )
        return (
            {s.name: v for s, v in zip(sig.outputs, outputs, strict=True)},
            {s.name: v for s, v in zip(sig.states, states, strict=True)},
        )

    # -- internals ------------------------------------------------------------
    def _check(self, values: list[np.ndarray]) -> list[np.ndarray]:
        if len(values) != len(self._arg_specs):
            raise ValueError(
                f"the step takes {len(self._arg_specs)} tensor(s) "
                f"({', '.join(s.name for s in self._arg_specs)}), got {len(values)}"
            )
        checked = []
        batch = None
        for spec, value in zip(self._arg_specs, values, strict=True):
            array = np.asarray(value)
            if array.shape[1:] != spec.shape:
                raise ValueError(
                    f"{spec.name}: expected shape (batch, {', '.join(map(str, spec.shape))}) "
                    f"got {array.shape}"
                )
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise ValueError(f"{spec.name}: batch size {array.shape[0]} differs from {batch}")
            checked.append(array.astype(spec.dtype, copy=False))
        return checked

    def _run_padded(self, values: list[np.ndarray], batch: int) -> list[np.ndarray]:
        bucket = self.bucket_for(batch)
        if bucket != batch:
            padded = []
            for value in values:
                full = np.zeros((bucket, *value.shape[1:]), dtype=value.dtype)
                full[:batch] = value
                padded.append(full)
            values = padded
        raw = self._run_bucket(values, bucket)
        return [r[:batch] for r in raw] if bucket != batch else raw

    def _run_bucket(self, values: list[np.ndarray], bucket: int) -> list[np.ndarray]:
        compiled = self._compiled.get(bucket)
        if compiled is not None:
            return compiled(values)
        with self._lock:  # the first call of a bucket traces and compiles it: once
            compiled = self._compiled.get(bucket)
            if compiled is None:
                compiled = self._compile(bucket)
                result = compiled(values)
                self._compiled[bucket] = compiled
                return result
        return compiled(values)
