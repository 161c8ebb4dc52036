"""`StepSignature`: what one step of a model takes and gives, by name.

The server validates requests against it, sizes state records from it and
answers metadata queries with it; none of that needs Keras tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@functools.cache
def _numpy_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of one sample: `shape` excludes the batch axis."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return _numpy_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of one sample of this tensor."""
        return math.prod(self.shape) * self.numpy_dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _initial_zeros(states: Sequence[TensorSpec]) -> Callable[[int], list[np.ndarray]]:
    def zeros(batch_size: int) -> list[np.ndarray]:
        return [np.zeros((batch_size, *s.shape), dtype=s.dtype) for s in states]

    return zeros


@dataclass(frozen=True)
class StepSignature:
    """Named sequence inputs, constants, states and outputs of one timestep.

    `initial_states(batch_size)` gives the states a new session starts from
    (the model's state initializers, zeros by default).
    """

    inputs: tuple[TensorSpec, ...]
    constants: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    initial_state_fn: Callable[[int], list[np.ndarray]] | None = field(
        default=None, compare=False, repr=False
    )

    def initial_states(self, batch_size: int = 1) -> list[np.ndarray]:
        fn = self.initial_state_fn or _initial_zeros(self.states)
        return [
            np.asarray(s, dtype=spec.dtype)
            for s, spec in zip(fn(batch_size), self.states, strict=True)
        ]

    @property
    def state_nbytes(self) -> int:
        """Bytes of one session's states (what the state store keeps per session)."""
        return sum(s.nbytes for s in self.states)

    def to_dict(self) -> dict[str, Any]:
        return {
            role: [spec.to_dict() for spec in getattr(self, role)]
            for role in ("inputs", "constants", "states", "outputs")
        }


def _tensor_name(tensor: Any) -> str:
    """The producing layer's name (`dense_3`, or `lstm_cell_2` for a multi-output layer's
    output 2); for an Input, the name given to `keras.Input`."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return str(tensor.name)
    name = str(history.operation.name)
    return name if not history.tensor_index else f"{name}_{history.tensor_index}"


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        candidate = name
        while candidate in seen:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
        seen.setdefault(candidate, 0)
        result.append(candidate)
    return result


def specs_from_tensors(
    tensors: Sequence[Any], names: Sequence[str] | None = None, *, role: str
) -> list[TensorSpec]:
    """TensorSpecs from Keras tensors of one timestep (batch axis first, dropped)."""
    names = list(names) if names is not None else [_tensor_name(t) for t in tensors]
    specs = []
    for tensor, name in zip(tensors, names, strict=True):
        shape = tuple(tensor.shape[1:])
        if any(dim is None for dim in shape):
            raise ValueError(
                f"{role} {name!r} has shape {shape} with an unknown dimension; "
                "a served step needs every dimension but the batch fixed"
            )
        specs.append(
            TensorSpec(name=name, shape=tuple(int(d) for d in shape), dtype=str(tensor.dtype))
        )
    return specs


def make_signature(
    *,
    inputs: Sequence[Any],
    constants: Sequence[Any],
    states: Sequence[Any],
    outputs: Sequence[Any],
    initial_state_fn: Callable[[int], list[np.ndarray]] | None,
) -> StepSignature:
    """A signature from the step graph's tensors, with names unique across roles."""
    groups = [list(inputs), list(constants), list(states), list(outputs)]
    raw_names = [_tensor_name(t) for group in groups for t in group]
    names = _unique(raw_names)
    specs: list[list[TensorSpec]] = []
    start = 0
    for role, group in zip(("input", "constant", "state", "output"), groups, strict=True):
        specs.append(specs_from_tensors(group, names[start : start + len(group)], role=role))
        start += len(group)
    return StepSignature(
        inputs=tuple(specs[0]),
        constants=tuple(specs[1]),
        states=tuple(specs[2]),
        outputs=tuple(specs[3]),
        initial_state_fn=initial_state_fn,
    )
