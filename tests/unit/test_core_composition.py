"""Composition and persistence: the grid of roles, nesting, Bidirectional, saving."""

from __future__ import annotations

import itertools
from pathlib import Path

import keras
import numpy as np
import pytest

from rnnserve.core import RecurrentModel, RecurrentSequential

L = keras.layers
RNG = np.random.default_rng(11)


def _x(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype("float32")


def _np(x: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _outputs(value: object) -> list[np.ndarray]:
    return [_np(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def grid_model(
    cell: str, n_seq_in: int, n_seq_out: int, n_const: int, n_final: int, readout: bool
) -> RecurrentModel:
    """A step graph with the given number of each role around one built-in cell."""
    units = 6
    seq_inputs = [keras.Input((3 + i,), name=f"x{i}") for i in range(n_seq_in)]
    constants = [keras.Input((2,), name=f"c{i}") for i in range(n_const)]
    readout_in = keras.Input((4,), name="y_prev") if readout else None
    feed = [*seq_inputs, *constants] + ([readout_in] if readout_in is not None else [])
    if not feed:  # a decoder with no constant: feed nothing but its own state
        feed = []
    if cell == "lstm":
        states = [keras.Input((units,), name="h"), keras.Input((units,), name="c")]
        cell_layer: L.Layer = L.LSTMCell(units)
    else:
        states = [keras.Input((units,), name="h")]
        cell_layer = L.SimpleRNNCell(units)
    joined = (feed[0] if len(feed) == 1 else L.concatenate(feed)) if feed else L.Dense(2)(states[0])
    h, new_states = cell_layer(joined, states)
    seq_outputs = [L.Dense(4, name=f"y{i}")(h) for i in range(max(n_seq_out, 1 if readout else 0))]
    finals = [L.Dense(1, name=f"f{i}")(h) for i in range(n_final)]
    state_inputs = states + ([readout_in] if readout_in is not None else [])
    state_outputs = list(new_states) + ([seq_outputs[0]] if readout else [])
    if not seq_outputs and not finals:
        finals = [L.Dense(1, name="f_only")(h)]
    return RecurrentModel(
        sequence_inputs=seq_inputs,
        constant_inputs=constants,
        state_inputs=state_inputs,
        sequence_outputs=seq_outputs,
        state_outputs=state_outputs,
        final_outputs=finals,
        return_sequences=True,
        output_length=None if seq_inputs else 4,
    )


def _pairwise_cases() -> list[tuple[str, int, int, int, int, bool]]:
    """Every pair of option values appears in at least one case (greedy covering),
    which exercises each interaction of two roles without the full product."""
    factors = [["simple", "lstm"], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1], [False, True]]
    # A decoder (no sequence input) needs a constant to know its batch size.
    candidates = [c for c in itertools.product(*factors) if not (c[1] == 0 and c[3] == 0)]
    uncovered = {
        (i, a, j, b)
        for c in candidates
        for (i, a), (j, b) in itertools.combinations(enumerate(c), 2)
    }
    chosen = []
    while uncovered:
        best = max(
            candidates,
            key=lambda c: sum(
                (i, a, j, b) in uncovered
                for (i, a), (j, b) in itertools.combinations(enumerate(c), 2)
            ),
        )
        chosen.append(best)
        uncovered -= {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(best), 2)}
    return chosen  # type: ignore[return-value]


GRID = [
    pytest.param(*case, id="{}-in{}-out{}-c{}-f{}-r{}".format(*case[:5], int(case[5])))
    for case in _pairwise_cases()
]


@pytest.mark.parametrize(("cell", "n_seq_in", "n_seq_out", "n_const", "n_final", "readout"), GRID)
def test_grid_of_roles_fits_and_round_trips(
    cell: str, n_seq_in: int, n_seq_out: int, n_const: int, n_final: int, readout: bool
) -> None:
    rnn = grid_model(cell, n_seq_in, n_seq_out, n_const, n_final, readout)
    batch, steps = 8, 4
    sequences = [keras.Input((None, 3 + i)) for i in range(n_seq_in)]
    constants = [keras.Input((2,)) for _ in range(n_const)]
    outputs = rnn(sequences if sequences else None, constants=constants or None)
    model = keras.Model([*sequences, *constants], outputs)
    data = [_x(batch, steps, 3 + i) for i in range(n_seq_in)] + [
        _x(batch, 2) for _ in range(n_const)
    ]
    expected = _outputs(model(data))
    targets = [np.zeros_like(e) for e in expected]
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(data, targets, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    for out in expected:
        assert out.shape[0] == batch
    n_sequence = max(n_seq_out, 1 if readout else 0)
    for out in expected[:n_sequence]:
        assert out.shape[:2] == (batch, steps)

    # Config round trip: same structure; weights round trip: same numbers.
    clone = RecurrentModel.from_config(rnn.get_config())
    clone.set_weights(rnn.get_weights())
    rebuilt = keras.Model(
        [*sequences, *constants],
        clone(sequences if sequences else None, constants=constants or None),
    )
    for got, want in zip(_outputs(rebuilt(data)), _outputs(model(data)), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_nested_recurrent_model_as_a_cell() -> None:
    x_t, h = keras.Input((5,)), keras.Input((4,))
    h_t = L.Dense(4, activation="tanh")(L.concatenate([x_t, h]))
    inner = RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=h,
        sequence_outputs=h_t,
        state_outputs=h_t,
        return_sequences=True,
    )

    x_t2, h_in, g_in = keras.Input((5,)), keras.Input((4,)), keras.Input((3,))
    y_inner, [h_next] = inner.cell(x_t2, [h_in])
    y, [g_next] = L.GRUCell(3)(y_inner, [g_in])
    outer = RecurrentModel(
        sequence_inputs=x_t2,
        state_inputs=[h_in, g_in],
        sequence_outputs=y,
        state_outputs=[h_next, g_next],
        return_sequences=True,
    )
    x = _x(6, 5, 5)
    # The nested cell shares the inner model's weights: outer == GRU over inner.
    gru = L.GRU(3, return_sequences=True)
    gru.build((None, None, 4))
    gru.set_weights(outer.step_model.layers[-1].get_weights())
    np.testing.assert_allclose(_np(outer(x)), _np(gru(inner(x))), atol=1e-5)
    # And the cell drives keras.layers.RNN too.
    np.testing.assert_allclose(
        _np(L.RNN(inner.cell, return_sequences=True)(x)), _np(inner(x)), atol=1e-6
    )


def test_nested_recurrent_sequential() -> None:
    inner = RecurrentSequential([L.GRUCell(4)], return_sequences=True)
    x = _x(3, 5, 2)
    first = inner(x)
    outer = RecurrentSequential([inner, L.SimpleRNNCell(3)], return_sequences=True)
    simple = L.SimpleRNN(3, return_sequences=True)
    simple.build((None, None, 4))
    got = outer(x)
    simple.set_weights(outer.stack[1].get_weights())
    np.testing.assert_allclose(_np(got), _np(simple(first)), atol=1e-5)


def test_bidirectional_wraps_a_recurrent_model() -> None:
    x_t, h = keras.Input((5,)), keras.Input((4,))
    h_t = L.Dense(4, activation="tanh")(L.concatenate([x_t, h]))
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        state_inputs=h,
        sequence_outputs=h_t,
        state_outputs=h_t,
        return_sequences=True,
    )
    bidi = L.Bidirectional(rnn, merge_mode="concat")
    x = _x(3, 6, 5)
    out = _np(bidi(x))
    assert out.shape == (3, 6, 8)
    forward = _np(bidi.forward_layer(x))
    backward = _np(bidi.backward_layer(x))
    np.testing.assert_allclose(out[..., :4], forward, atol=1e-6)
    np.testing.assert_allclose(out[..., 4:], backward[:, ::-1], atol=1e-6)
    assert bidi.backward_layer.go_backwards and not bidi.forward_layer.go_backwards


def test_keras_file_round_trip(tmp_path: Path) -> None:
    x_t, c, h = keras.Input((5,)), keras.Input((2,)), keras.Input((4,))
    y_t, [h_t] = L.GRUCell(4)(L.concatenate([x_t, c]), [h])
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        constant_inputs=c,
        state_inputs=h,
        sequence_outputs=y_t,
        state_outputs=h_t,
        final_outputs=L.Dense(2)(y_t),
        return_sequences=True,
    )
    sequences, constant = keras.Input((None, 5)), keras.Input((2,))
    stack = RecurrentSequential([L.LSTMCell(3), L.Dense(4)], readout="add", return_sequences=True)
    seq_out, final = rnn(sequences, constants=[constant])
    model = keras.Model([sequences, constant], [L.Bidirectional(stack)(seq_out), final])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    data = [_x(4, 7, 5), _x(4, 2)]
    for got, want in zip(_outputs(loaded(data)), _outputs(model(data)), strict=True):
        np.testing.assert_array_equal(got, want)
