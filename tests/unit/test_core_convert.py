"""from_keras: ordinary Keras sequence models in step form, same numbers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rnnserve.core import ConversionError, StepFunction, from_keras

L = keras.layers
RNG = np.random.default_rng(3)


def _x(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype("float32")


def _np(x: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _sequential(*layers: L.Layer, features: int = 6) -> keras.Model:
    return keras.Sequential([keras.Input((None, features)), *layers])


CONVERTIBLE = [
    pytest.param(lambda: _sequential(L.LSTM(8)), id="lstm-last"),
    pytest.param(lambda: _sequential(L.GRU(8, return_sequences=True)), id="gru-sequences"),
    pytest.param(
        lambda: _sequential(L.SimpleRNN(5, return_sequences=True), L.LSTM(4), L.Dense(3)),
        id="stack-dense",
    ),
    pytest.param(
        lambda: _sequential(
            L.TimeDistributed(L.Dense(7)),
            L.LayerNormalization(),
            L.GRU(6, return_sequences=True),
            L.Dropout(0.5),
            L.Activation("relu"),
            L.TimeDistributed(L.Dense(2)),
        ),
        id="per-step-layers",
    ),
    pytest.param(lambda: _sequential(L.RNN(L.LSTMCell(4), return_sequences=True)), id="rnn-cell"),
    pytest.param(
        lambda: _sequential(L.RNN([L.GRUCell(4), L.SimpleRNNCell(3)], return_sequences=True)),
        id="stacked-cells",
    ),
    pytest.param(
        lambda: keras.Sequential(
            [
                keras.Input((None,), dtype="int32"),
                L.Embedding(30, 5),
                L.LSTM(6, return_sequences=True),
                L.Dense(30),
            ]
        ),
        id="embedding-tokens",
    ),
]


@pytest.mark.parametrize("factory", CONVERTIBLE)
def test_converted_model_computes_the_same(factory) -> None:
    model = factory()
    data = (
        RNG.integers(0, 30, size=(4, 9)).astype("int32")
        if model.inputs[0].dtype == "int32"
        else _x(4, 9, 6)
    )
    converted = from_keras(model)
    np.testing.assert_allclose(_np(converted(data)), _np(model(data)), atol=1e-5)
    # Weights are copied, not shared: changing the original leaves the copy alone.
    before = _np(converted(data))
    model.set_weights([w + 1.0 for w in model.get_weights()])
    np.testing.assert_array_equal(_np(converted(data)), before)


def test_functional_model_with_branches_and_two_outputs() -> None:
    inputs = keras.Input((None, 6), name="features")
    a = L.LSTM(5, return_sequences=True, name="left")(inputs)
    b = L.GRU(5, return_sequences=True, name="right")(inputs)
    merged = L.Concatenate(name="joined")([a, b])
    per_step = L.Dense(3, name="per_step")(merged)
    summary = L.Dense(2, name="summary")(L.SimpleRNN(4, name="tail")(merged))
    model = keras.Model(inputs, [per_step, summary])
    converted = from_keras(model)
    x = _x(3, 7, 6)
    got = [_np(v) for v in converted(x)]
    want = [_np(v) for v in model(x)]
    assert converted.return_sequences
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    step = StepFunction(converted)
    assert [s.name for s in step.signature.outputs] == ["per_step", "summary"]
    assert [s.name for s in step.signature.states] == ["left_h", "left_c", "right_h", "tail_h"]
    assert [s.name for s in step.signature.inputs] == ["features"]


def test_return_state_outputs_become_final_values() -> None:
    inputs = keras.Input((None, 6))
    out, h, c = L.LSTM(4, return_state=True)(inputs)
    model = keras.Model(inputs, [out, h, c])
    converted = from_keras(model)
    x = _x(2, 5, 6)
    for got, want in zip(converted(x), model(x), strict=True):
        np.testing.assert_allclose(_np(got), _np(want), atol=1e-5)


def test_nested_submodel_is_flattened() -> None:
    inner = _sequential(L.GRU(4, return_sequences=True), L.Dense(4))
    inputs = keras.Input((None, 6))
    model = keras.Model(inputs, L.LSTM(3)(inner(inputs)))
    x = _x(2, 5, 6)
    np.testing.assert_allclose(_np(from_keras(model)(x)), _np(model(x)), atol=1e-5)


def _encoder_decoder() -> keras.Model:
    enc_in, dec_in = keras.Input((None, 6)), keras.Input((None, 6))
    _, h, c = L.LSTM(4, return_state=True, name="encoder")(enc_in)
    out = L.LSTM(4, name="decoder")(dec_in, initial_state=[h, c])
    return keras.Model([enc_in, dec_in], out)


UNCONVERTIBLE = [
    pytest.param(
        lambda: _sequential(L.Bidirectional(L.LSTM(4), name="bidi")),
        "bidi",
        "backward",
        id="bidirectional",
    ),
    pytest.param(
        lambda: _sequential(L.LSTM(4, go_backwards=True, name="rev")),
        "rev",
        "go_backwards",
        id="go-backwards",
    ),
    pytest.param(
        lambda: _sequential(L.Conv1D(4, 3, name="conv")),
        "conv",
        "not a recurrent layer",
        id="conv1d",
    ),
    pytest.param(
        lambda: keras.Sequential([keras.Input((None, 6)), L.Dense(3)], name="dense_only"),
        "dense_only",
        "no recurrent layer",
        id="no-rnn",
    ),
    pytest.param(
        lambda: _sequential(L.LSTM(4, name="first"), L.RepeatVector(3, name="repeat"), L.LSTM(2)),
        "repeat",
        "not a recurrent",
        id="repeat-vector",
    ),
    pytest.param(
        lambda: keras.Sequential(
            [
                keras.Input((None,), dtype="int32"),
                L.Embedding(9, 3, mask_zero=True, name="emb"),
                L.GRU(3),
            ]
        ),
        "emb",
        "mask_zero",
        id="mask-zero",
    ),
    pytest.param(_encoder_decoder, "decoder", "initial_state", id="encoder-decoder"),
    pytest.param(
        lambda: _sequential(L.LSTM(4, return_sequences=True), L.Softmax(axis=1, name="over_time")),
        "over_time",
        "crosses timesteps",
        id="softmax-over-time",
    ),
]


@pytest.mark.parametrize(("factory", "layer_name", "reason"), UNCONVERTIBLE)
def test_unconvertible_layers_are_named_with_the_reason(
    factory, layer_name: str, reason: str
) -> None:
    model = factory()
    with pytest.raises(ConversionError, match=reason) as caught:
        from_keras(model)
    assert caught.value.layer_name == layer_name
    assert repr(layer_name) in str(caught.value)


def test_model_around_a_recurrent_model_is_converted() -> None:
    from rnnserve.core import RecurrentModel

    x_t, h = keras.Input((6,)), keras.Input((4,))
    h_t = L.Dense(4, activation="tanh")(L.concatenate([x_t, h]))
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=h,
        sequence_outputs=h_t,
        state_outputs=h_t,
        return_sequences=True,
        name="inner",
    )
    inputs = keras.Input((None, 6))
    model = keras.Model(
        inputs, L.Dense(2, name="head")(L.GRU(3, return_sequences=True)(rnn(inputs)))
    )
    converted = from_keras(model)
    x = _x(3, 5, 6)
    np.testing.assert_allclose(_np(converted(x)), _np(model(x)), atol=1e-5)
    step = StepFunction(converted)
    assert step.signature.states[0].name == "inner_state_0"
    assert [s.name for s in step.signature.outputs] == ["head"]
