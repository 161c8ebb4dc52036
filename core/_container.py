"""`RecurrentModel`: a Keras layer that runs a one-timestep graph over sequences.

Keras 3's `keras.layers.RNN` takes one input tensor and a cell; it has no
constants, several inputs or outputs, readout, decode mode or teacher forcing.
`RecurrentModel` takes the step as a functional graph instead and scans it
over time itself (`_loop.scan`), so all of these come from the graph's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from rnnserve.core._graph import StepLayout, as_list, build_step_model, call_step
from rnnserve.core._loop import scan

_PACKAGE = "rnnserve"


def _initializer_list(initializers: Any, n_states: int) -> list[keras.initializers.Initializer]:
    if initializers is None:
        items: list[Any] = ["zeros"] * n_states
    elif isinstance(initializers, (list, tuple)):
        items = list(initializers)
        if len(items) != n_states:
            raise ValueError(
                f"state_initializers: got {len(items)} initializer(s) for {n_states} state(s)"
            )
    else:
        items = [initializers] * n_states
    return [keras.initializers.get(item) for item in items]


def _spec(tensor: Any) -> tuple[tuple[int | None, ...], str]:
    return tuple(tensor.shape[1:]), str(tensor.dtype)


def _mask_like(mask_t: Any, value: Any) -> Any:
    """Broadcast a `(batch,)` boolean mask against `value` of shape `(batch, ...)`."""
    return ops.reshape(mask_t, (-1,) + (1,) * (len(value.shape) - 1))


class _StepGraphLayer(keras.layers.Layer):
    """Shared plumbing: holds the step model, its layout and the state initializers."""

    def __init__(
        self,
        *,
        step_model: keras.Model | None,
        layout: StepLayout | None,
        state_initializers: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._state_initializers_arg = state_initializers
        if step_model is not None and layout is not None:
            self._attach(step_model, layout)

    def _attach(self, step_model: keras.Model, layout: StepLayout) -> None:
        """Adopt a built step graph (at construction, or in `build` for deferred graphs)."""
        self.step_model = step_model
        self.layout = layout
        self.state_initializers = _initializer_list(self._state_initializers_arg, layout.n_states)
        self.built = True

    # -- what the step graph looks like ------------------------------------
    @property
    def state_specs(self) -> list[tuple[tuple[int | None, ...], str]]:
        first = self.layout.n_sequence_inputs + self.layout.n_constants
        return [_spec(t) for t in self.step_model.inputs[first:]]

    @property
    def output_specs(self) -> list[tuple[tuple[int | None, ...], str]]:
        """Shapes (no batch) and dtypes of the sequence outputs then the final outputs."""
        outs = self.step_model.outputs
        return [_spec(outs[i]) for i in (*self.layout.sequence_outputs, *self.layout.final_outputs)]

    def get_initial_state(self, batch_size: Any) -> list[Any]:
        """The states a sequence starts from when the caller gives none."""
        states = []
        for init, (shape, dtype) in zip(self.state_initializers, self.state_specs, strict=True):
            states.append(init(shape=(batch_size, *shape), dtype=dtype))
        return states

    def _run_step(self, values: Sequence[Any], training: Any = None) -> tuple[list[Any], list[Any]]:
        """One step on tensors -> (distinct tracked outputs, new states)."""
        outs = call_step(self.step_model, values, training=training)
        return (
            [outs[i] for i in self.layout.tracked_outputs],
            [outs[i] for i in self.layout.state_outputs],
        )

    def _base_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            step_model=keras.saving.serialize_keras_object(self.step_model),
            layout=self.layout.get_config(),
            state_initializers=[
                keras.saving.serialize_keras_object(init) for init in self.state_initializers
            ],
        )
        return config

    @staticmethod
    def _restore(config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        config["step_model"] = keras.saving.deserialize_keras_object(config["step_model"])
        config["layout"] = StepLayout.from_config(config["layout"])
        config["state_initializers"] = [
            keras.saving.deserialize_keras_object(init) for init in config["state_initializers"]
        ]
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecurrentModel(_StepGraphLayer):
    """A recurrent layer defined by the functional graph of one timestep.

    Build the graph of ONE timestep with `keras.Input` tensors (no time axis),
    then name the role of each tensor:

    - `sequence_inputs`: fed one timestep of a `(batch, time, ...)` sequence.
    - `constant_inputs`: fed the same `(batch, ...)` value at every step.
    - `state_inputs` / `state_outputs`: paired by position; output i at step t
      is input i at step t+1. A state output may also be a sequence output
      (readout: the previous output fed back in).
    - `sequence_outputs`: one value per timestep (all of them with
      `return_sequences=True`, else the last).
    - `final_outputs`: their value at the last timestep.

    Called as `layer(sequences, initial_state=..., constants=..., mask=...,
    ground_truth=...)`, it returns `[*sequence_outputs, *final_outputs]`
    followed by the final states when `return_state=True` (a single tensor
    when that list has one element). With no sequence inputs it is a decoder
    that runs `output_length` steps from its constants and initial state.
    """

    def __init__(
        self,
        sequence_inputs: Any = None,
        state_inputs: Any = None,
        sequence_outputs: Any = None,
        state_outputs: Any = None,
        *,
        constant_inputs: Any = None,
        final_outputs: Any = None,
        state_initializers: Any = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        unroll: bool = False,
        output_length: int | None = None,
        teacher_force: bool = False,
        zero_output_for_mask: bool = False,
        stateful: bool = False,
        step_model: keras.Model | None = None,
        layout: StepLayout | None = None,
        **kwargs: Any,
    ) -> None:
        if stateful:
            raise ValueError(
                "RecurrentModel keeps no state between calls; pass initial_state and "
                "return_state=True, or serve it with rnnserve, which keeps per-session state"
            )
        if step_model is None:
            step_model, layout = build_step_model(
                sequence_inputs=as_list(sequence_inputs),
                constant_inputs=as_list(constant_inputs),
                state_inputs=as_list(state_inputs),
                sequence_outputs=as_list(sequence_outputs),
                final_outputs=as_list(final_outputs),
                state_outputs=as_list(state_outputs),
                name=f"{kwargs['name']}_step" if kwargs.get("name") else None,
            )
        elif layout is None:
            raise ValueError("step_model given without its layout")
        assert layout is not None
        super().__init__(
            step_model=step_model, layout=layout, state_initializers=state_initializers, **kwargs
        )
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.unroll = bool(unroll)
        self.output_length = None if output_length is None else int(output_length)
        self.teacher_force = bool(teacher_force)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.stateful = False
        self.supports_masking = True
        self._check_options()

    def _check_options(self) -> None:
        """Options that depend on the graph's layout (checked once it is known)."""
        layout = self.layout
        if layout.n_sequence_inputs == 0 and self.output_length is None:
            raise ValueError(
                "a step graph with no sequence input is a decoder: give output_length, "
                "the number of steps to generate"
            )
        if self.output_length is not None and self.output_length < 1:
            raise ValueError(f"output_length must be >= 1, got {self.output_length}")
        if self.teacher_force and not layout.readouts:
            raise ValueError(
                "teacher_force=True needs a readout: a state output that is also a "
                "sequence output, whose previous value the ground truth replaces"
            )

    @property
    def cell(self) -> RecurrentCell:
        """This model's step as a cell sharing its weights (nesting, `keras.layers.RNN`)."""
        return RecurrentCell(
            step_model=self.step_model,
            layout=self.layout,
            state_initializers=self.state_initializers,
            name=f"{self.name}_cell",
        )

    # -- calling ------------------------------------------------------------
    def _arguments(
        self, inputs: Any, initial_state: Any, constants: Any
    ) -> tuple[list[Any], list[Any], list[Any] | None]:
        layout = self.layout
        sequences = as_list(inputs)
        if layout.n_sequence_inputs == 0 and sequences and constants is None:
            sequences, constants = [], sequences  # a decoder called on its constants
        constants_list = as_list(constants)
        if len(sequences) != layout.n_sequence_inputs:
            raise ValueError(
                f"{self.name} expects {layout.n_sequence_inputs} sequence input(s), "
                f"got {len(sequences)}"
            )
        if len(constants_list) != layout.n_constants:
            raise ValueError(
                f"{self.name} expects {layout.n_constants} constant(s), got {len(constants_list)}"
            )
        for position, seq in enumerate(sequences):
            if len(seq.shape) < 2:
                raise ValueError(
                    f"{self.name}: sequence input {position} must be (batch, time, ...); "
                    f"got shape {tuple(seq.shape)}"
                )
        states = None if initial_state is None else as_list(initial_state)
        if states is not None and len(states) != layout.n_states:
            raise ValueError(
                f"{self.name} expects {layout.n_states} initial state(s), got {len(states)}"
            )
        return sequences, constants_list, states

    def _batch_source(
        self, sequences: list[Any], constants: list[Any], states: list[Any] | None
    ) -> Any:
        """A tensor whose axis 0 is the batch: the first sequence, else (decoder) the
        first constant or initial state."""
        for source in (*sequences, *constants, *(states or [])):
            return source
        raise ValueError(
            f"{self.name} is a decoder with neither constants nor initial_state: "
            "pass initial_state so the batch size is known"
        )

    def _output_shapes(self, batch: Any, length: Any) -> list[tuple[tuple[Any, ...], str]]:
        """(shape, dtype) of each returned tensor, in return order."""
        shapes = []
        n_sequence = len(self.layout.sequence_outputs)
        for position, (shape, dtype) in enumerate(self.output_specs):
            if position < n_sequence and self.return_sequences:
                shapes.append(((batch, length, *shape), dtype))
            else:
                shapes.append(((batch, *shape), dtype))
        if self.return_state:
            shapes += [((batch, *shape), dtype) for shape, dtype in self.state_specs]
        return shapes

    def compute_output_spec(
        self,
        inputs: Any = None,
        initial_state: Any = None,
        constants: Any = None,
        mask: Any = None,
        training: Any = None,
        ground_truth: Any = None,
    ) -> Any:
        sequences, constants_list, states = self._arguments(inputs, initial_state, constants)
        batch = self._batch_source(sequences, constants_list, states).shape[0]
        length = sequences[0].shape[1] if sequences else self.output_length
        outputs = [keras.KerasTensor(s, dtype=d) for s, d in self._output_shapes(batch, length)]
        return outputs[0] if len(outputs) == 1 else outputs

    def compute_output_shape(self, inputs_shape: Any, initial_state_shape: Any = None) -> Any:
        first = inputs_shape[0] if isinstance(inputs_shape[0], (tuple, list)) else inputs_shape
        length = first[1] if self.layout.n_sequence_inputs else self.output_length
        shapes = [s for s, _ in self._output_shapes(first[0], length)]
        return shapes[0] if len(shapes) == 1 else shapes

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        combined = _combine_masks(mask) if self.return_sequences else None
        n_sequence = len(self.layout.sequence_outputs)
        n_total = len(self.output_specs) + (self.layout.n_states if self.return_state else 0)
        masks = [combined if i < n_sequence else None for i in range(n_total)]
        return masks[0] if n_total == 1 else masks

    def call(
        self,
        inputs: Any = None,
        initial_state: Any = None,
        constants: Any = None,
        mask: Any = None,
        training: Any = None,
        ground_truth: Any = None,
    ) -> Any:
        layout = self.layout
        sequences, constants_list, states = self._arguments(inputs, initial_state, constants)
        batch = ops.shape(self._batch_source(sequences, constants_list, states))[0]
        if states is None:
            states = self.get_initial_state(batch)
        combined_mask = _combine_masks(mask) if sequences else None

        forcing = bool(self.teacher_force and training and ground_truth is not None)
        truths = as_list(ground_truth) if forcing else []
        if forcing and len(truths) != len(layout.readouts):
            raise ValueError(
                f"{self.name}: ground_truth needs {len(layout.readouts)} tensor(s), one per "
                f"readout state; got {len(truths)}"
            )
        if forcing:
            # At step t the readout state receives the ground truth of step t-1
            # (the initial state at t=0): shift the truth one step right.
            truths = [
                ops.concatenate(
                    [ops.expand_dims(ops.cast(states[state_pos], truth.dtype), 1), truth[:, :-1]],
                    axis=1,
                )
                for (state_pos, _), truth in zip(layout.readouts, truths, strict=True)
            ]

        time_major = [*sequences]
        if combined_mask is not None:
            time_major.append(ops.cast(combined_mask, "bool"))
        time_major += truths
        if self.go_backwards:
            time_major = [ops.flip(x, axis=1) for x in time_major]
        time_major = [ops.moveaxis(x, 1, 0) for x in time_major]

        n_seq = len(sequences)
        has_mask = combined_mask is not None
        tracked_specs = [_spec(self.step_model.outputs[i]) for i in layout.tracked_outputs]
        seq_positions = [layout.tracked_outputs.index(i) for i in layout.sequence_outputs]
        final_positions = [layout.tracked_outputs.index(i) for i in layout.final_outputs]
        collect = self.return_sequences
        zero_masked = self.zero_output_for_mask

        def step(carry: Any, x_t: list[Any]) -> tuple[Any, list[Any]]:
            prev_states, prev_outputs = carry
            seq_t = x_t[:n_seq]
            mask_t = x_t[n_seq] if has_mask else None
            truth_t = x_t[n_seq + int(has_mask) :]
            step_states = list(prev_states)
            for (state_pos, _), value in zip(layout.readouts, truth_t, strict=False):
                step_states[state_pos] = value
            outputs, new_states = self._run_step(
                [*seq_t, *constants_list, *step_states], training=training
            )
            emitted = outputs
            if mask_t is not None:
                new_states = [
                    ops.where(_mask_like(mask_t, new), new, old)
                    for new, old in zip(new_states, prev_states, strict=True)
                ]
                outputs = [
                    ops.where(_mask_like(mask_t, new), new, old)
                    for new, old in zip(outputs, prev_outputs, strict=True)
                ]
                emitted = (
                    [ops.where(_mask_like(mask_t, o), o, ops.zeros_like(o)) for o in outputs]
                    if zero_masked
                    else outputs
                )
            ys = [emitted[p] for p in seq_positions] if collect else []
            return (list(new_states), list(outputs)), ys

        initial_outputs = [
            ops.zeros((batch, *shape), dtype=dtype) for shape, dtype in tracked_specs
        ]
        y_specs = (
            [((None, *tracked_specs[p][0]), tracked_specs[p][1]) for p in seq_positions]
            if collect
            else []
        )
        (final_states, last_outputs), ys = scan(
            step,
            (list(states), initial_outputs),
            time_major,
            length=None if sequences else self.output_length,
            y_specs=y_specs,
            unroll=self.unroll,
        )
        if collect:
            results = [ops.moveaxis(y, 0, 1) for y in ys]
        else:
            results = [last_outputs[p] for p in seq_positions]
        results += [last_outputs[p] for p in final_positions]
        if self.return_state:
            results += list(final_states)
        return results[0] if len(results) == 1 else results

    # -- serialization ------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = self._base_config()
        config.update(
            return_sequences=self.return_sequences,
            return_state=self.return_state,
            go_backwards=self.go_backwards,
            unroll=self.unroll,
            output_length=self.output_length,
            teacher_force=self.teacher_force,
            zero_output_for_mask=self.zero_output_for_mask,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecurrentModel:
        return cls(**cls._restore(config))


def _combine_masks(mask: Any) -> Any:
    masks = [m for m in as_list(mask) if m is not None]
    if not masks:
        return None
    combined = ops.cast(masks[0], "bool")
    for other in masks[1:]:
        combined = ops.logical_and(combined, ops.cast(other, "bool"))
    return combined


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecurrentCell(_StepGraphLayer):
    """One timestep of a `RecurrentModel`, called like a Keras RNN cell.

    `outputs, new_states = cell(inputs, states, constants=...)` inside another
    step graph (nesting), or `keras.layers.RNN(cell)` for a single-input step.
    """

    @property
    def state_size(self) -> list[Any]:
        return [shape[0] if len(shape) == 1 else list(shape) for shape, _ in self.state_specs]

    @property
    def output_size(self) -> Any:
        shape = self.output_specs[0][0]
        return shape[0] if len(shape) == 1 else list(shape)

    def _split(self, inputs: Any, states: Any, constants: Any) -> list[Any]:
        sequences, states_list, constants_list = (
            as_list(inputs),
            as_list(states),
            as_list(constants),
        )
        layout = self.layout
        for role, got, want in (
            ("input", len(sequences), layout.n_sequence_inputs),
            ("state", len(states_list), layout.n_states),
            ("constant", len(constants_list), layout.n_constants),
        ):
            if got != want:
                raise ValueError(f"{self.name} expects {want} {role}(s), got {got}")
        return [*sequences, *constants_list, *states_list]

    def compute_output_spec(
        self, inputs: Any, states: Any = None, constants: Any = None, training: Any = None
    ) -> Any:
        batch = self._split(inputs, states, constants)[0].shape[0]
        outputs = [keras.KerasTensor((batch, *s), dtype=d) for s, d in self.output_specs]
        new_states = [keras.KerasTensor((batch, *s), dtype=d) for s, d in self.state_specs]
        return (outputs[0] if len(outputs) == 1 else outputs), new_states

    def call(
        self, inputs: Any, states: Any = None, constants: Any = None, training: Any = None
    ) -> Any:
        outs = call_step(self.step_model, self._split(inputs, states, constants), training)
        layout = self.layout
        outputs = [outs[i] for i in (*layout.sequence_outputs, *layout.final_outputs)]
        new_states = [outs[i] for i in layout.state_outputs]
        return (outputs[0] if len(outputs) == 1 else outputs), new_states

    def get_config(self) -> dict[str, Any]:
        return self._base_config()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecurrentCell:
        return cls(**cls._restore(config))
