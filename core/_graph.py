"""The one-timestep graph: which tensors are inputs, constants, states and outputs.

A step graph is an ordinary Keras functional model whose inputs are, in order,
the sequence inputs, the constants and the states of ONE timestep, and whose
outputs are the distinct tensors among the sequence outputs, the final outputs
and the state outputs. `StepLayout` records which output plays which role, so
that a tensor used twice (an output fed back as a state: readout) is computed
once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras


def as_list(value: Any) -> list[Any]:
    """`None` -> `[]`, a tensor -> `[tensor]`, a list/tuple -> a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass(frozen=True)
class StepLayout:
    """Positions of each role in the step model's inputs and outputs."""

    n_sequence_inputs: int
    n_constants: int
    n_states: int
    sequence_outputs: tuple[int, ...]
    final_outputs: tuple[int, ...]
    state_outputs: tuple[int, ...]

    @property
    def tracked_outputs(self) -> tuple[int, ...]:
        """Distinct step-model outputs returned to callers (sequence then final)."""
        seen: list[int] = []
        for index in (*self.sequence_outputs, *self.final_outputs):
            if index not in seen:
                seen.append(index)
        return tuple(seen)

    @property
    def readouts(self) -> tuple[tuple[int, int], ...]:
        """`(state position, sequence-output position)` for each fed-back output."""
        pairs = []
        for state_pos, out_index in enumerate(self.state_outputs):
            if out_index in self.sequence_outputs:
                pairs.append((state_pos, self.sequence_outputs.index(out_index)))
        return tuple(pairs)

    def get_config(self) -> dict[str, Any]:
        return {
            "n_sequence_inputs": self.n_sequence_inputs,
            "n_constants": self.n_constants,
            "n_states": self.n_states,
            "sequence_outputs": list(self.sequence_outputs),
            "final_outputs": list(self.final_outputs),
            "state_outputs": list(self.state_outputs),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StepLayout:
        return cls(
            n_sequence_inputs=int(config["n_sequence_inputs"]),
            n_constants=int(config["n_constants"]),
            n_states=int(config["n_states"]),
            sequence_outputs=tuple(config["sequence_outputs"]),
            final_outputs=tuple(config["final_outputs"]),
            state_outputs=tuple(config["state_outputs"]),
        )


def _is_input_tensor(tensor: Any) -> bool:
    history = getattr(tensor, "_keras_history", None)
    return history is not None and isinstance(history.operation, keras.layers.InputLayer)


def build_step_model(
    *,
    sequence_inputs: Sequence[Any],
    constant_inputs: Sequence[Any],
    state_inputs: Sequence[Any],
    sequence_outputs: Sequence[Any],
    final_outputs: Sequence[Any],
    state_outputs: Sequence[Any],
    name: str | None = None,
) -> tuple[keras.Model, StepLayout]:
    """Check the roles and build the functional step model with its layout."""
    if len(state_inputs) != len(state_outputs):
        raise ValueError(
            f"state_inputs and state_outputs pair up by position: got {len(state_inputs)} "
            f"state input(s) and {len(state_outputs)} state output(s)"
        )
    if not sequence_outputs and not final_outputs and not state_outputs:
        raise ValueError("a step graph needs at least one output")
    inputs = [*sequence_inputs, *constant_inputs, *state_inputs]
    seen_inputs: set[int] = set()
    for role, group in (
        ("sequence_inputs", sequence_inputs),
        ("constant_inputs", constant_inputs),
        ("state_inputs", state_inputs),
    ):
        for position, tensor in enumerate(group):
            if not _is_input_tensor(tensor):
                raise ValueError(
                    f"{role}[{position}] must be a tensor made by keras.Input "
                    f"(one timestep, no time axis); got {tensor!r}"
                )
            if id(tensor) in seen_inputs:
                raise ValueError(f"{role}[{position}] ({tensor.name}) is used in two roles")
            seen_inputs.add(id(tensor))
    for position, (state_in, state_out) in enumerate(zip(state_inputs, state_outputs, strict=True)):
        if tuple(state_in.shape[1:]) != tuple(state_out.shape[1:]):
            raise ValueError(
                f"state {position} ({state_in.name}): the state input has shape "
                f"{tuple(state_in.shape[1:])} but its state output has shape "
                f"{tuple(state_out.shape[1:])}"
            )

    unique: list[Any] = []

    def index_of(tensor: Any) -> int:
        for i, known in enumerate(unique):
            if known is tensor:
                return i
        unique.append(tensor)
        return len(unique) - 1

    layout = StepLayout(
        n_sequence_inputs=len(sequence_inputs),
        n_constants=len(constant_inputs),
        n_states=len(state_inputs),
        sequence_outputs=tuple(index_of(t) for t in sequence_outputs),
        final_outputs=tuple(index_of(t) for t in final_outputs),
        state_outputs=tuple(index_of(t) for t in state_outputs),
    )
    model = keras.Model(inputs=inputs, outputs=unique, name=name)
    return model, layout


def call_step(model: keras.Model, values: Sequence[Any], training: Any = None) -> list[Any]:
    """Call the step model on a flat list of tensors; always returns a list."""
    return as_list(model(list(values), training=training))
