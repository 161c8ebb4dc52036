"""`RecurrentSequential`: a stack of cells and per-step layers as one recurrent layer.

The step graph is built when the input shape is first known: each cell gets
its own state inputs, per-step layers (`Dense`, `Activation`...) are applied
to the running output, and every state of every layer moves forward together.
With `readout`, the stack's output at step t-1 is combined with its input at
step t (added or multiplied, so their shapes must match).
"""

from __future__ import annotations

from typing import Any

import keras

from rnnserve.core._container import RecurrentModel
from rnnserve.core._graph import as_list, build_step_model

_READOUT_MODES = ("add", "mul")


def _step_form(layer: Any) -> Any:
    """The object called at each step for `layer`: itself, or the cell of an RNN layer."""
    if isinstance(layer, RecurrentModel):
        return layer.cell
    if isinstance(layer, keras.layers.RNN):
        return layer.cell
    return layer


@keras.saving.register_keras_serializable(package="rnnserve")
class RecurrentSequential(RecurrentModel):
    """Cells (`LSTMCell`, `GRUCell`, `SimpleRNNCell`, RNN layers, other
    `RecurrentModel`s) and per-step layers, stacked; call it on sequences like
    any `RecurrentModel`.

        rnn = RecurrentSequential([SimpleRNNCell(10), LSTMCell(12), Dense(5), GRUCell(8)])
        y = rnn(x)  # x: (batch, time, features)
    """

    def __init__(
        self,
        layers: list[Any] | None = None,
        *,
        readout: str | None = None,
        input_dtype: str = "float32",
        state_initializers: Any = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        unroll: bool = False,
        teacher_force: bool = False,
        zero_output_for_mask: bool = False,
        **kwargs: Any,
    ) -> None:
        if readout is not None and readout not in _READOUT_MODES:
            raise ValueError(f"readout must be one of {_READOUT_MODES} or None, got {readout!r}")
        if teacher_force and readout is None:
            raise ValueError("teacher_force=True needs a readout (readout='add' or 'mul')")
        keras.layers.Layer.__init__(self, **kwargs)
        self._state_initializers_arg = state_initializers
        self.stack: list[Any] = []
        for layer in layers or []:
            self.add(layer)
        self.readout = readout
        self.sequence_dtype = input_dtype
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.unroll = bool(unroll)
        self.output_length = None
        self.teacher_force = bool(teacher_force)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.stateful = False
        self.supports_masking = True
        self.built = False

    def add(self, layer: Any) -> None:
        """Append a cell or a per-step layer (before the first call)."""
        if self.built:
            raise RuntimeError(f"{self.name} is already built; add layers before calling it")
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"RecurrentSequential takes Keras layers, got {layer!r}")
        self.stack.append(layer)

    def build(self, inputs_shape: Any = None, **_: Any) -> None:
        if not self.stack:
            raise ValueError(f"{self.name} has no layers")
        shape = inputs_shape[0] if isinstance(inputs_shape[0], (tuple, list)) else inputs_shape
        x_t = keras.Input(
            shape=tuple(shape[2:]), dtype=self.sequence_dtype, name=f"{self.name}_input"
        )
        state_inputs: list[Any] = []
        state_outputs: list[Any] = []
        readout_in = None
        x = x_t
        if self.readout is not None:
            readout_in = keras.Input(shape=tuple(shape[2:]), name=f"{self.name}_readout")
            merge = keras.layers.Add if self.readout == "add" else keras.layers.Multiply
            x = merge(name=f"{self.name}_readout_{self.readout}")([x_t, readout_in])
        for layer in self.stack:
            step = _step_form(layer)
            if not hasattr(step, "state_size"):
                x = step(x)
                continue
            sizes = as_list(step.state_size)
            states_in = [
                keras.Input(shape=tuple(as_list(size)), name=f"{layer.name}_state_{k}")
                for k, size in enumerate(sizes)
            ]
            x, new_states = step(x, states_in)
            state_inputs += states_in
            state_outputs += as_list(new_states)
        if readout_in is not None:
            if tuple(x.shape[1:]) != tuple(readout_in.shape[1:]):
                raise ValueError(
                    f"readout={self.readout!r} combines the output {tuple(x.shape[1:])} "
                    f"with the input {tuple(readout_in.shape[1:])}: their shapes must match"
                )
            state_inputs.insert(0, readout_in)
            state_outputs.insert(0, x)
        step_model, layout = build_step_model(
            sequence_inputs=[x_t],
            constant_inputs=[],
            state_inputs=state_inputs,
            sequence_outputs=[x],
            final_outputs=[],
            state_outputs=state_outputs,
            name=f"{self.name}_step",
        )
        self._attach(step_model, layout)
        self._check_options()

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = keras.layers.Layer.get_config(self)
        config.update(
            layers=[keras.saving.serialize_keras_object(layer) for layer in self.stack],
            readout=self.readout,
            input_dtype=self.sequence_dtype,
            state_initializers=(
                None
                if self._state_initializers_arg is None
                else keras.saving.serialize_keras_object(self._state_initializers_arg)
            ),
            return_sequences=self.return_sequences,
            return_state=self.return_state,
            go_backwards=self.go_backwards,
            unroll=self.unroll,
            teacher_force=self.teacher_force,
            zero_output_for_mask=self.zero_output_for_mask,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecurrentSequential:
        config = dict(config)
        config["layers"] = [keras.saving.deserialize_keras_object(c) for c in config["layers"]]
        if config.get("state_initializers") is not None:
            config["state_initializers"] = keras.saving.deserialize_keras_object(
                config["state_initializers"]
            )
        return cls(**config)
