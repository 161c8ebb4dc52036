"""RecurrentModel: the seeds' scenarios, with shapes and numbers checked."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from rnnserve.core import RecurrentModel, RecurrentSequential

L = keras.layers
RNG = np.random.default_rng(7)


def _x(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype("float32")


def _np(x: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def vanilla_rnn(units: int = 10, features: int = 5, **options: object) -> RecurrentModel:
    """The RecurrentShop README's simple RNN: h_t = tanh(W x_t + U h_{t-1} + b)."""
    x_t = keras.Input((features,), name="x")
    h_tm1 = keras.Input((units,), name="h")
    h_t = L.Activation("tanh")(
        L.add(
            [
                L.Dense(units, name="kernel")(x_t),
                L.Dense(units, use_bias=False, name="recurrent")(h_tm1),
            ]
        )
    )
    return RecurrentModel(
        sequence_inputs=x_t, state_inputs=h_tm1, sequence_outputs=h_t, state_outputs=h_t, **options
    )


def _copy_simple_rnn_weights(rnn: RecurrentModel, reference: L.SimpleRNN) -> None:
    kernel, recurrent, bias = reference.get_weights()
    rnn.step_model.get_layer("kernel").set_weights([kernel, bias])
    rnn.step_model.get_layer("recurrent").set_weights([recurrent])


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="last"),
        pytest.param({"return_sequences": True}, id="sequences"),
        pytest.param({"return_sequences": True, "go_backwards": True}, id="backwards"),
        pytest.param({"return_sequences": True, "unroll": True}, id="unrolled"),
        pytest.param({"return_sequences": True, "return_state": True}, id="with-state"),
    ],
)
def test_vanilla_step_graph_equals_keras_simple_rnn(options: dict[str, object]) -> None:
    x = _x(3, 7, 5)
    reference = L.SimpleRNN(10, **options)
    expected = reference(x)
    rnn = vanilla_rnn(**options)
    _copy_simple_rnn_weights(rnn, reference)
    got = rnn(x)
    if options.get("return_state"):
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(_np(g), _np(e), atol=1e-5)
    else:
        np.testing.assert_allclose(_np(got), _np(expected), atol=1e-5)


def test_seed_shapes_in_a_functional_model() -> None:
    x = _x(1, 7, 5)
    rnn = vanilla_rnn()
    inputs = keras.Input((7, 5))
    assert keras.Model(inputs, rnn(inputs)).predict(x, verbose=0).shape == (1, 10)
    rnn2 = vanilla_rnn(return_sequences=True)
    inputs = keras.Input((None, 5))  # variable length
    model2 = keras.Model(inputs, rnn2(inputs))
    assert model2.predict(x, verbose=0).shape == (1, 7, 10)
    assert model2.predict(_x(4, 11, 5), verbose=0).shape == (4, 11, 10)


def test_masked_steps_keep_state_like_keras() -> None:
    x = _x(4, 6, 5)
    x[0, 3:] = 0.0
    x[2, 1:] = 0.0
    inputs = keras.Input((None, 5))
    masked = L.Masking()(inputs)
    reference_layer = L.SimpleRNN(10, return_sequences=True)
    reference = keras.Model(inputs, reference_layer(masked))
    rnn = vanilla_rnn(return_sequences=True)
    _copy_simple_rnn_weights(rnn, reference_layer)
    ours = keras.Model(inputs, rnn(masked))
    np.testing.assert_allclose(_np(ours(x)), _np(reference(x)), atol=1e-5)
    # The last output of a masked row is the output of its last real step.
    last = vanilla_rnn()
    _copy_simple_rnn_weights(last, reference_layer)
    np.testing.assert_allclose(
        _np(keras.Model(inputs, last(masked))(x))[0], _np(ours(x))[0, 2], atol=1e-5
    )


def test_stack_of_builtin_cells_in_a_step_graph() -> None:
    x_t = keras.Input((5,))
    h1, c1, h2, h3 = keras.Input((7,)), keras.Input((7,)), keras.Input((8,)), keras.Input((10,))
    y1, [h1n, c1n] = L.LSTMCell(7)(x_t, [h1, c1])
    y2, [h2n] = L.SimpleRNNCell(8)(y1, [h2])
    y3, [h3n] = L.GRUCell(10)(y2, [h3])
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=[h1, c1, h2, h3],
        sequence_outputs=y3,
        state_outputs=[h1n, c1n, h2n, h3n],
    )
    assert tuple(rnn(_x(12, 7, 5)).shape) == (12, 10)


def test_stack_equals_the_same_keras_layers_in_sequence() -> None:
    x = _x(12, 7, 5)
    stack = RecurrentSequential([L.LSTMCell(7), L.SimpleRNNCell(8), L.GRUCell(10)])
    got = _np(stack(x))
    reference = keras.Sequential(
        [
            L.RNN(L.LSTMCell(7), return_sequences=True),
            L.RNN(L.SimpleRNNCell(8), return_sequences=True),
            L.RNN(L.GRUCell(10)),
        ]
    )
    reference.build((None, None, 5))
    reference.set_weights(stack.get_weights())
    assert got.shape == (12, 10)
    np.testing.assert_allclose(got, _np(reference(x)), atol=1e-5)


def test_decoder_generates_output_length_steps_from_a_constant() -> None:
    c = keras.Input((5,))
    h = keras.Input((10,))
    h_t = L.Activation("tanh")(L.add([L.Dense(10)(c), L.Dense(10)(h)]))
    decoder = RecurrentModel(
        constant_inputs=c,
        state_inputs=h,
        sequence_outputs=h_t,
        state_outputs=h_t,
        output_length=7,
        return_sequences=True,
    )
    constant = _x(32, 5)
    out = _np(decoder(constant))
    assert out.shape == (32, 7, 10)
    # Step by step by hand: the same graph fed the constant and its own state.
    state = np.zeros((32, 10), "float32")
    for t in range(7):
        state = _np(decoder.step_model([constant, state]))
        np.testing.assert_allclose(out[:, t], state, atol=1e-5)
    inputs = keras.Input((5,))
    assert keras.Model(inputs, decoder(inputs)).predict(constant, verbose=0).shape == (32, 7, 10)


def test_decoder_without_output_length_is_refused() -> None:
    c, h = keras.Input((5,)), keras.Input((3,))
    h_t = L.Dense(3)(L.concatenate([c, h]))
    with pytest.raises(ValueError, match="output_length"):
        RecurrentModel(constant_inputs=c, state_inputs=h, sequence_outputs=h_t, state_outputs=h_t)


def readout_model(**options: object) -> RecurrentModel:
    """y_t = W [x_t, y_{t-1}, h_{t-1}]: the previous output fed back (readout)."""
    x_t, y_tm1, h_tm1 = keras.Input((5,)), keras.Input((3,)), keras.Input((6,))
    h_t = L.Dense(6, activation="tanh", name="hidden")(L.concatenate([x_t, y_tm1, h_tm1]))
    y_t = L.Dense(3, name="readout")(h_t)
    return RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=[y_tm1, h_tm1],
        sequence_outputs=y_t,
        state_outputs=[y_t, h_t],
        return_sequences=True,
        **options,
    )


def _readout_by_hand(rnn: RecurrentModel, x: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """Step the graph in numpy; `previous[:, t]` replaces y_{t-1} when given (teacher forcing)."""
    batch, steps = x.shape[:2]
    y, h = np.zeros((batch, 3), "float32"), np.zeros((batch, 6), "float32")
    outs = []
    for t in range(steps):
        y_in = y if previous is None or t == 0 else previous[:, t - 1]
        y, h = (_np(v) for v in rnn.step_model([x[:, t], y_in, h]))
        outs.append(y)
    return np.stack(outs, axis=1)


def test_readout_feeds_the_previous_output_back() -> None:
    rnn = readout_model()
    x = _x(4, 6, 5)
    np.testing.assert_allclose(_np(rnn(x)), _readout_by_hand(rnn, x, None), atol=1e-5)


def test_teacher_forcing_feeds_ground_truth_in_training_only() -> None:
    rnn = readout_model(teacher_force=True)
    x, truth = _x(4, 6, 5), _x(4, 6, 3)
    forced = _np(rnn(x, ground_truth=truth, training=True))
    np.testing.assert_allclose(forced, _readout_by_hand(rnn, x, truth), atol=1e-5)
    free = _np(rnn(x, ground_truth=truth, training=False))
    np.testing.assert_allclose(free, _readout_by_hand(rnn, x, None), atol=1e-5)
    assert not np.allclose(forced, free)
    # It trains in a functional model that takes the ground truth as an input.
    xs, ys = keras.Input((None, 5)), keras.Input((None, 3))
    model = keras.Model([xs, ys], rnn(xs, ground_truth=ys))
    model.compile(optimizer="adam", loss="mse")
    history = model.fit([x, truth], truth, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_teacher_forcing_needs_a_readout() -> None:
    x_t, h = keras.Input((2,)), keras.Input((4,))
    out = L.Dense(3)(x_t)
    h_t = L.Dense(4)(h)
    with pytest.raises(ValueError, match="teacher_force=True needs a readout"):
        RecurrentModel(
            sequence_inputs=x_t,
            state_inputs=h,
            sequence_outputs=out,
            state_outputs=h_t,
            teacher_force=True,
        )


def test_constants_and_initial_state_and_final_outputs() -> None:
    x_t, c, h = keras.Input((4,)), keras.Input((2,)), keras.Input((3,))
    h_t = L.Dense(3, activation="tanh")(L.concatenate([x_t, c, h]))
    score = L.Dense(1, name="score")(h_t)
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        constant_inputs=c,
        state_inputs=h,
        sequence_outputs=h_t,
        state_outputs=h_t,
        final_outputs=score,
        return_sequences=True,
        return_state=True,
    )
    x, constant, start = _x(5, 4, 4), _x(5, 2), _x(5, 3)
    sequence, final, state = (_np(v) for v in rnn(x, constants=[constant], initial_state=[start]))
    assert sequence.shape == (5, 4, 3) and final.shape == (5, 1) and state.shape == (5, 3)
    running = start
    for t in range(4):
        running, last_score = (_np(v) for v in rnn.step_model([x[:, t], constant, running]))
        np.testing.assert_allclose(sequence[:, t], running, atol=1e-5)
    np.testing.assert_allclose(final, last_score, atol=1e-5)
    np.testing.assert_allclose(state, running, atol=1e-5)


def test_state_initializers() -> None:
    rnn = vanilla_rnn(state_initializers="ones", return_state=True, return_sequences=True)
    explicit = vanilla_rnn(return_state=True, return_sequences=True)
    explicit.set_weights(rnn.get_weights())
    x = _x(2, 3, 5)
    np.testing.assert_allclose(
        _np(rnn(x)[0]), _np(explicit(x, initial_state=[np.ones((2, 10), "float32")])[0]), atol=1e-6
    )


def test_wrong_arguments_name_the_problem() -> None:
    rnn = vanilla_rnn()
    with pytest.raises(ValueError, match="expects 1 sequence input"):
        rnn([_x(1, 2, 5), _x(1, 2, 5)])
    with pytest.raises(ValueError, match="expects 1 initial state"):
        rnn(_x(1, 2, 5), initial_state=[_x(1, 10), _x(1, 10)])
    x_t, h = keras.Input((5,)), keras.Input((4,))
    with pytest.raises(ValueError, match="pair up by position"):
        RecurrentModel(
            sequence_inputs=x_t, state_inputs=h, sequence_outputs=L.Dense(4)(x_t), state_outputs=[]
        )
    with pytest.raises(ValueError, match="state input has shape"):
        RecurrentModel(
            sequence_inputs=x_t,
            state_inputs=h,
            sequence_outputs=L.Dense(3)(x_t),
            state_outputs=L.Dense(3)(x_t),
        )
    with pytest.raises(ValueError, match=r"keras\.Input"):
        RecurrentModel(
            sequence_inputs=L.Dense(3)(x_t), state_inputs=h, sequence_outputs=h, state_outputs=h
        )
