"""The time loop under `RecurrentModel`, one implementation per Keras backend.

Keras 3 has `keras.ops.scan`, but its TensorFlow version requires every
per-step output to have the carry's structure, which would stack the states of
every timestep. The loop here stacks only what the caller asks for:
`step(carry, x_t) -> (carry, y_t)` where `y_t` is a (possibly empty) list.

All tensors in `xs` and the returned `ys` are time-major: `(time, batch, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

Carry = Any
StepFn = Callable[[Carry, list[Any]], tuple[Carry, list[Any]]]


def scan(
    step: StepFn,
    carry: Carry,
    xs: Sequence[Any],
    *,
    length: int | None = None,
    y_specs: Sequence[tuple[tuple[int | None, ...], str]] = (),
    unroll: bool = False,
) -> tuple[Carry, list[Any]]:
    """Run `step` over the leading (time) axis of `xs`.

    `length` is required when `xs` is empty (decode mode); `y_specs` gives the
    per-step shape (batch first, batch may be None) and dtype of each `y_t`,
    which the graph-mode loops need to allocate their output buffers.
    """
    static_length = length if length is not None else (xs[0].shape[0] if xs else None)
    if unroll:
        if static_length is None:
            raise ValueError(
                "unroll=True needs a fixed number of timesteps; got a sequence whose "
                "time dimension is None"
            )
        return _scan_unrolled(step, carry, xs, int(static_length), len(y_specs))
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _scan_tensorflow(step, carry, xs, length, y_specs)
    if backend == "jax":
        return _scan_jax(step, carry, xs, length)
    if static_length is None:
        static_length = int(ops.shape(xs[0])[0])
    return _scan_unrolled(step, carry, xs, int(static_length), len(y_specs))


def _scan_unrolled(
    step: StepFn, carry: Carry, xs: Sequence[Any], length: int, n_ys: int
) -> tuple[Carry, list[Any]]:
    collected: list[list[Any]] = [[] for _ in range(n_ys)]
    for t in range(length):
        carry, ys = step(carry, [x[t] for x in xs])
        for bucket, y in zip(collected, ys, strict=True):
            bucket.append(y)
    return carry, [ops.stack(bucket, axis=0) for bucket in collected]


def _scan_tensorflow(
    step: StepFn,
    carry: Carry,
    xs: Sequence[Any],
    length: int | None,
    y_specs: Sequence[tuple[tuple[int | None, ...], str]],
) -> tuple[Carry, list[Any]]:
    import tensorflow as tf

    xs = [tf.convert_to_tensor(x) for x in xs]
    n = length if length is not None else tf.shape(xs[0])[0]
    x_arrays = [tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x) for x in xs]
    y_arrays = [
        tf.TensorArray(dtype, size=n, element_shape=tf.TensorShape(shape))
        for shape, dtype in y_specs
    ]
    flat_carry = tf.nest.flatten(carry)

    def body(t: Any, flat: list[Any], ys: list[Any]) -> tuple[Any, list[Any], list[Any]]:
        new_carry, y_t = step(
            tf.nest.pack_sequence_as(carry, flat), [xa.read(t) for xa in x_arrays]
        )
        new_flat = [
            tf.ensure_shape(tf.convert_to_tensor(c), old.shape)
            for c, old in zip(tf.nest.flatten(new_carry), flat, strict=True)
        ]
        ys = [ya.write(t, y) for ya, y in zip(ys, y_t, strict=True)]
        return t + 1, new_flat, ys

    _, flat_carry, y_arrays = tf.while_loop(
        lambda t, *_: t < n,
        body,
        (tf.constant(0), flat_carry, y_arrays),
        shape_invariants=(
            tf.TensorShape([]),
            [tf.TensorShape(c.shape) for c in flat_carry],
            [tf.TensorShape(None) for _ in y_arrays],
        ),
    )
    return tf.nest.pack_sequence_as(carry, flat_carry), [ya.stack() for ya in y_arrays]


def _scan_jax(
    step: StepFn, carry: Carry, xs: Sequence[Any], length: int | None
) -> tuple[Carry, list[Any]]:
    import jax

    def body(c: Carry, x: list[Any] | None) -> tuple[Carry, list[Any]]:
        return step(c, list(x) if x is not None else [])

    carry, ys = jax.lax.scan(body, carry, list(xs) if xs else None, length=length)
    return carry, list(ys)
