"""`from_keras`: turn an ordinary Keras sequence model into step form.

The model's graph is replayed on one-timestep inputs: each recurrent layer
(`LSTM`, `GRU`, `SimpleRNN`, `RNN(cell)`) becomes a call of a copy of its cell
on new state inputs, and each per-timestep layer (`Dense`, `Embedding`,
`TimeDistributed`...) a call of a copy of itself. Weights are copied, so the
result is independent of the original but computes the same thing.

A tensor is either a *sequence* (one value per step) or *last* (the value at
the final step, after a recurrent layer with `return_sequences=False`).
Per-step layers applied to a last value commute with taking the last step,
so they stay in the step graph; a recurrent layer after a last value does not.
"""

from __future__ import annotations

from typing import Any

import keras

from rnnserve.core._container import RecurrentModel
from rnnserve.core._graph import as_list

SEQUENCE, LAST = "sequence", "last"

# Layers that act on each timestep independently, so running them inside the
# step graph equals running them on the whole sequence.
_PER_STEP_LAYERS: tuple[type[Any], ...] = (
    keras.layers.Dense,
    keras.layers.Embedding,
    keras.layers.Dropout,
    keras.layers.Activation,
    keras.layers.LayerNormalization,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
    keras.layers.Identity,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)

_STATE_NAMES = {
    keras.layers.LSTMCell: ("h", "c"),
    keras.layers.GRUCell: ("h",),
    keras.layers.SimpleRNNCell: ("h",),
}


class ConversionError(ValueError):
    """A layer of the model has no step form; the message names it and says why."""

    def __init__(self, layer: Any, reason: str) -> None:
        self.layer_name = getattr(layer, "name", repr(layer))
        super().__init__(
            f"cannot convert layer {self.layer_name!r} ({type(layer).__name__}): {reason}"
        )


def _copy_layer(layer: Any, name: str) -> Any:
    """A fresh layer with the same config (weights are copied after it is built)."""
    config = layer.get_config()
    config["name"] = name
    try:
        return layer.__class__.from_config(config)
    except Exception as exc:  # a custom layer whose config does not round-trip
        raise ConversionError(
            layer, f"its get_config() does not rebuild it ({exc}); make from_config work"
        ) from exc


def _axis_is_last(axis: Any, rank: int) -> bool:
    axes = as_list(axis)
    return all(a in (-1, rank - 1) for a in axes)


class _Converter:
    def __init__(self) -> None:
        self.kinds: dict[int, str] = {}
        self.state_inputs: list[Any] = []
        self.state_outputs: list[Any] = []
        self.copies: list[tuple[Any, Any]] = []  # (copy, original) pairs for the weights

    def kind_of(self, tensors: list[Any]) -> str:
        kinds = {self.kinds.get(id(t), SEQUENCE) for t in tensors}
        return LAST if kinds == {LAST} else SEQUENCE if kinds == {SEQUENCE} else "mixed"

    def mark(self, outputs: Any, kind: str) -> Any:
        for tensor in keras.tree.flatten(outputs):
            self.kinds[id(tensor)] = kind
        return outputs

    # -- the per-layer rules --------------------------------------------------
    def call(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        tensors = [
            t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)
        ]
        kind = self.kind_of(tensors)
        if isinstance(layer, keras.layers.Bidirectional):
            raise ConversionError(
                layer,
                "its backward direction reads the sequence from the end, so it "
                "cannot run one step at a time",
            )
        if isinstance(layer, keras.layers.RNN):
            return self.recurrent(layer, args, kwargs, kind)
        if isinstance(layer, RecurrentModel):
            return self.recurrent_model(layer, args, kwargs, kind)
        if isinstance(layer, keras.Model):
            return _functional_view(layer)._run_through_graph(as_list(args[0]), call_fn=self.call)
        if isinstance(layer, keras.layers.TimeDistributed):
            inner = _copy_layer(layer.layer, layer.name)
            self.check_per_step(layer.layer, tensors, rank=len(args[0].shape) + 1)
            self.copies.append((inner, layer.layer))
            return self.mark(inner(*args, **_without_mask(kwargs)), kind)
        if isinstance(layer, _PER_STEP_LAYERS):
            if kind == "mixed":
                raise ConversionError(
                    layer,
                    "it combines a per-step sequence with the last value of another "
                    "sequence, which has no single-step form",
                )
            self.check_per_step(layer, tensors, rank=len(tensors[0].shape) + 1)
            copy = _copy_layer(layer, layer.name)
            self.copies.append((copy, layer))
            return self.mark(copy(*args, **_without_mask(kwargs)), kind)
        raise ConversionError(
            layer,
            "it is not a recurrent layer nor a layer known to act on each timestep "
            "separately (Dense, Embedding, Dropout, Activation, LayerNormalization, "
            "TimeDistributed, merge layers...)",
        )

    def check_per_step(self, layer: Any, tensors: list[Any], rank: int) -> None:
        """`rank` is the rank the layer saw in the original (sequence) model."""
        if isinstance(layer, keras.layers.Embedding) and layer.mask_zero:
            raise ConversionError(
                layer,
                "mask_zero=True masks padded steps of a whole sequence; a served "
                "step is never padding. Set mask_zero=False (weights unchanged) to convert",
            )
        if isinstance(
            layer, (keras.layers.Concatenate, keras.layers.Softmax)
        ) and not _axis_is_last(layer.axis, rank):
            raise ConversionError(
                layer, f"axis={layer.axis} crosses timesteps; only the last axis can"
            )
        if isinstance(layer, keras.layers.LayerNormalization) and not _axis_is_last(
            layer.axis, rank
        ):
            raise ConversionError(layer, f"axis={layer.axis} normalizes across timesteps")

    def recurrent(
        self, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], kind: str
    ) -> Any:
        if layer.go_backwards:
            raise ConversionError(layer, "go_backwards=True reads the sequence from the end")
        if kwargs.get("initial_state") is not None:
            raise ConversionError(
                layer,
                "its initial_state comes from another tensor (an encoder-decoder); "
                "convert the encoder and the decoder separately",
            )
        if kind != SEQUENCE:
            raise ConversionError(
                layer, "its input is the last value of another sequence, not a sequence"
            )
        x = args[0]
        cells = (
            list(layer.cell.cells)
            if isinstance(layer.cell, keras.layers.StackedRNNCells)
            else [layer.cell]
        )
        states_out: list[Any] = []
        for position, original in enumerate(cells):
            name = layer.name if len(cells) == 1 else f"{layer.name}_{position}"
            cell = _copy_layer(original, name)
            self.copies.append((cell, original))
            sizes = as_list(original.state_size)
            labels = _STATE_NAMES.get(type(original), tuple(str(k) for k in range(len(sizes))))
            if len(labels) != len(sizes):
                labels = tuple(str(k) for k in range(len(sizes)))
            states_in = [
                keras.Input(
                    shape=tuple(as_list(size)),
                    dtype=layer.compute_dtype,
                    name=f"{name}_{label}",
                )
                for size, label in zip(sizes, labels, strict=True)
            ]
            x, new_states = cell(x, states_in)
            new_states = as_list(new_states)
            self.state_inputs += states_in
            self.state_outputs += new_states
            states_out += new_states
        self.mark(x, SEQUENCE if layer.return_sequences else LAST)
        self.mark(states_out, LAST)
        if layer.return_state:
            return [x, *states_out]
        return x

    def recurrent_model(
        self, layer: RecurrentModel, args: tuple[Any, ...], kwargs: dict[str, Any], kind: str
    ) -> Any:
        """A `RecurrentModel` inside the model: its step joins the converted step."""
        if layer.go_backwards:
            raise ConversionError(layer, "go_backwards=True reads the sequence from the end")
        if layer.layout.n_constants:
            raise ConversionError(
                layer,
                "it takes constants; serve the RecurrentModel itself (its constants "
                "become the session's constants) instead of a model around it",
            )
        if layer.layout.n_sequence_inputs == 0:
            raise ConversionError(layer, "a decoder generates its own steps; serve it directly")
        if kwargs.get("initial_state") is not None:
            raise ConversionError(layer, "its initial_state comes from another tensor")
        if kind != SEQUENCE:
            raise ConversionError(layer, "its input is the last value of another sequence")
        cell = _copy_layer(layer.cell, layer.name)
        self.copies.append((cell, layer.cell))
        states_in = [
            keras.Input(shape=tuple(shape), dtype=dtype, name=f"{layer.name}_state_{k}")
            for k, (shape, dtype) in enumerate(layer.state_specs)
        ]
        outputs, new_states = cell(as_list(args[0]), states_in)
        new_states = as_list(new_states)
        self.state_inputs += states_in
        self.state_outputs += new_states
        n_sequence = len(layer.layout.sequence_outputs)
        results = []
        for position, tensor in enumerate(as_list(outputs)):
            sequence = position < n_sequence and layer.return_sequences
            results.append(self.mark(tensor, SEQUENCE if sequence else LAST))
        if layer.return_state:
            results += self.mark(new_states, LAST)
        return results[0] if len(results) == 1 else results


def _without_mask(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "mask"}


def _functional_view(model: Any) -> Any:
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ConversionError(
                model,
                "the Sequential model has no input shape yet; start it with "
                "keras.Input((time, features)) or call build()",
            )
        return functional
    if not hasattr(model, "_run_through_graph"):
        raise ConversionError(
            model,
            "only Sequential and functional models have a graph to convert; "
            "a subclassed model's call() cannot be read",
        )
    return model


def from_keras(model: keras.Model, *, name: str | None = None) -> RecurrentModel:
    """Convert a Keras sequence model into a `RecurrentModel` with the same weights.

    A model that is only a `RecurrentModel` applied to inputs (how one is saved
    to a `.keras` file) gives that `RecurrentModel` back.

    Sequence outputs of the original stay sequence outputs (the result returns
    sequences); outputs of `return_sequences=False` layers become the per-step
    value whose last step is the original output. With both kinds, the result
    has `return_sequences=True` and returns the sequence outputs first, then
    the last-step ones as `final_outputs`.
    """
    if isinstance(model, RecurrentModel):
        return model
    functional = _functional_view(model)
    inner = [layer for layer in functional.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(inner) == 1 and isinstance(inner[0], RecurrentModel):
        # `keras.Model(inputs, rnn(inputs...))`: how a RecurrentModel is saved to a
        # .keras file. Serve it as it is (constants and all).
        return inner[0]
    step_inputs = []
    for tensor in functional.inputs:
        if len(tensor.shape) < 2:
            raise ConversionError(
                model,
                f"input {tensor.name!r} has shape {tuple(tensor.shape)}: expected "
                "(batch, time, ...)",
            )
        layer_name = tensor._keras_history.operation.name
        step_inputs.append(
            keras.Input(shape=tuple(tensor.shape[2:]), dtype=tensor.dtype, name=layer_name)
        )
    converter = _Converter()
    outputs = as_list(functional._run_through_graph(step_inputs, call_fn=converter.call))
    if not converter.state_inputs:
        raise ConversionError(model, "it has no recurrent layer (LSTM, GRU, SimpleRNN, RNN)")
    kinds = [converter.kinds.get(id(t), SEQUENCE) for t in outputs]
    sequence_outputs = [t for t, k in zip(outputs, kinds, strict=True) if k == SEQUENCE]
    last_outputs = [t for t, k in zip(outputs, kinds, strict=True) if k == LAST]
    if not sequence_outputs:
        sequence_outputs, last_outputs, return_sequences = last_outputs, [], False
    else:
        return_sequences = True
    converted = RecurrentModel(
        sequence_inputs=step_inputs,
        state_inputs=converter.state_inputs,
        sequence_outputs=sequence_outputs,
        state_outputs=converter.state_outputs,
        final_outputs=last_outputs,
        return_sequences=return_sequences,
        name=name or f"{model.name}_recurrent",
    )
    for copy, original in converter.copies:
        copy.set_weights(original.get_weights())
    return converted
