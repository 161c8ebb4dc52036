"""StepFunction and StepSignature: the serving view of a recurrent model."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.core import RecurrentModel, StepFunction, bucket_sizes, from_keras, step_signature

L = keras.layers
ROOT = Path(__file__).resolve().parents[2]


def _np(x: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def lstm_with_constant() -> RecurrentModel:
    x_t = keras.Input((4,), name="x")
    c = keras.Input((2,), name="context")
    h, cell = keras.Input((5,), name="h"), keras.Input((5,), name="c")
    y, [h_t, c_t] = L.LSTMCell(5, name="lstm")(L.concatenate([x_t, c]), [h, cell])
    out = L.Dense(3, name="y")(y)
    return RecurrentModel(
        sequence_inputs=x_t,
        constant_inputs=c,
        state_inputs=[h, cell],
        sequence_outputs=out,
        state_outputs=[h_t, c_t],
        return_sequences=True,
        state_initializers=["zeros", "ones"],
    )


def test_bucket_sizes_are_powers_of_two_covering_the_maximum() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert bucket_sizes(100)[-1] == 128
    with pytest.raises(ValueError, match="max_batch_size"):
        bucket_sizes(0)


def test_signature_names_shapes_dtypes_and_initial_states() -> None:
    sig = step_signature(lstm_with_constant())
    assert [(s.name, s.shape, s.dtype) for s in sig.inputs] == [("x", (4,), "float32")]
    assert [s.name for s in sig.constants] == ["context"]
    assert [(s.name, s.shape) for s in sig.states] == [("h", (5,)), ("c", (5,))]
    assert [(s.name, s.shape) for s in sig.outputs] == [("y", (3,))]
    assert sig.state_nbytes == 2 * 5 * 4
    h, c = sig.initial_states(3)
    np.testing.assert_array_equal(h, np.zeros((3, 5)))
    np.testing.assert_array_equal(c, np.ones((3, 5)))
    assert sig.to_dict()["states"][1] == {"name": "c", "shape": [5], "dtype": "float32"}


def test_padding_and_splitting_do_not_change_any_row() -> None:
    model = lstm_with_constant()
    step = StepFunction(model, max_batch_size=4)
    rng = np.random.default_rng(0)
    batch = 11  # padded to 4s and split: 4 + 4 + 3 (-> bucket 4)
    x, c = (
        rng.normal(size=(batch, 4)).astype("float32"),
        rng.normal(size=(batch, 2)).astype("float32"),
    )
    states = [rng.normal(size=(batch, 5)).astype("float32") for _ in range(2)]
    outputs, new_states = step([x], [c], states)
    assert outputs[0].shape == (batch, 3) and [s.shape for s in new_states] == [(batch, 5)] * 2
    for row in range(batch):
        one_out, one_states = step(
            [x[row : row + 1]], [c[row : row + 1]], [s[row : row + 1] for s in states]
        )
        np.testing.assert_allclose(outputs[0][row], one_out[0][0], atol=1e-5)
        for got, want in zip(new_states, one_states, strict=True):
            np.testing.assert_allclose(got[row], want[0], atol=1e-5)
    assert step.compiled_buckets == {1, 4}


def test_warmup_compiles_every_bucket() -> None:
    step = StepFunction(lstm_with_constant(), max_batch_size=16)
    assert step.warmup() == (1, 2, 4, 8, 16)
    assert step.compiled_buckets == {1, 2, 4, 8, 16}


def test_bad_arguments_are_named() -> None:
    step = StepFunction(lstm_with_constant(), max_batch_size=4)
    x, c, s = np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32"), np.zeros((2, 5), "float32")
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 4\)"):
        step([np.zeros((2, 3), "float32")], [c], [s, s])
    with pytest.raises(ValueError, match="batch size 3 differs"):
        step([x], [c], [s, np.zeros((3, 5), "float32")])
    with pytest.raises(ValueError, match="takes 4 tensor"):
        step([x], [], [s, s])
    with pytest.raises(ValueError, match="missing tensor"):
        step.call_named({"x": x, "h": s})
    outputs, states = step.call_named({"x": x, "context": c, "h": s, "c": s})
    assert set(outputs) == {"y"} and set(states) == {"h", "c"}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's call path")
def test_the_direct_tensorflow_call_equals_the_public_one_and_is_used() -> None:
    """The step skips `ConcreteFunction.__call__` (see `_direct_tf_call`); on this
    TensorFlow it must be taken, and agree with the public call on real data."""
    import tensorflow as tf

    step = StepFunction(lstm_with_constant(), max_batch_size=8)
    step.warmup()
    rng = np.random.default_rng(3)
    for bucket in (1, 2, 8):
        compiled = step._compiled[bucket]
        assert compiled.__name__ == "direct_tf_call", "TensorFlow moved: see _direct_tf_call"
        values = [
            rng.normal(size=(bucket, *spec.shape)).astype(spec.dtype) for spec in step._arg_specs
        ]
        public = tf.function(
            lambda *v: step.model.step_model(list(v), training=False), autograph=False
        )
        expected = [np.asarray(t) for t in public(*values)]
        got = compiled(values)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_keras_model_is_converted_on_the_way_in() -> None:
    model = keras.Sequential([keras.Input((None, 3)), L.GRU(4, return_sequences=True, name="gru")])
    step = StepFunction(model)
    assert [s.name for s in step.signature.states] == ["gru_h"]


# -- the invariant: one call == step by step == chunks ---------------------------


# Strategies draw a description; the test builds the model from it (building a
# Keras model draws initial weights from Python's random state, which must not
# happen inside a strategy).
GRAPH_SPECS = st.fixed_dictionaries(
    {
        "cell": st.sampled_from(["simple", "gru", "lstm"]),
        "input_sizes": st.lists(st.integers(1, 4), min_size=1, max_size=2),
        "n_constants": st.integers(0, 1),
        "readout": st.booleans(),
        "final": st.booleans(),
        "units": st.integers(1, 5),
        "random_init": st.booleans(),
    }
)

KERAS_SPECS = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["LSTM", "GRU", "SimpleRNN"]),
        "units": st.integers(1, 6),
        "second_gru": st.one_of(st.none(), st.integers(1, 4)),
    }
)


def build_step_graph(spec: dict) -> RecurrentModel:
    units = spec["units"]
    xs = [keras.Input((size,)) for size in spec["input_sizes"]]
    cs = [keras.Input((2,)) for _ in range(spec["n_constants"])]
    y_prev = keras.Input((3,)) if spec["readout"] else None
    feed = [*xs, *cs] + ([y_prev] if y_prev is not None else [])
    joined = feed[0] if len(feed) == 1 else L.concatenate(feed)
    layer = {"simple": L.SimpleRNNCell, "gru": L.GRUCell, "lstm": L.LSTMCell}[spec["cell"]](units)
    states = [keras.Input((units,)) for _ in range(2 if spec["cell"] == "lstm" else 1)]
    h, new_states = layer(joined, states)
    y = L.Dense(3)(h)
    return RecurrentModel(
        sequence_inputs=xs,
        constant_inputs=cs,
        state_inputs=states + ([y_prev] if y_prev is not None else []),
        sequence_outputs=y,
        state_outputs=list(new_states) + ([y] if y_prev is not None else []),
        final_outputs=[L.Dense(1)(h)] if spec["final"] else [],
        return_sequences=True,
        return_state=True,
        state_initializers="glorot_uniform" if spec["random_init"] else None,
    )


def build_keras_model(spec: dict) -> RecurrentModel:
    kind = getattr(L, spec["kind"])
    layers: list[L.Layer] = [keras.Input((None, 3)), kind(spec["units"], return_sequences=True)]
    if spec["second_gru"] is not None:
        layers.append(L.GRU(spec["second_gru"], return_sequences=True))
    layers.append(L.Dense(2))
    converted = from_keras(keras.Sequential(layers))
    converted.return_state = True
    return converted


def _check_invariant(model: RecurrentModel, data: st.DataObject) -> None:
    batch = data.draw(st.integers(1, 5), label="batch")
    steps = data.draw(st.integers(1, 6), label="steps")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    sig = step_signature(model)
    seqs = [rng.normal(size=(batch, steps, *s.shape)).astype(s.dtype) for s in sig.inputs]
    consts = [rng.normal(size=(batch, *s.shape)).astype(s.dtype) for s in sig.constants]
    start = [rng.normal(size=(batch, *s.shape)).astype(s.dtype) for s in sig.states]
    n_out = len(sig.outputs)

    whole = [_np(v) for v in model(seqs, initial_state=start, constants=consts or None)]
    whole_outputs, whole_states = whole[:n_out], whole[n_out:]

    # 1. The compiled step, one timestep at a time.
    step = StepFunction(model, max_batch_size=8)
    states = start
    stepped: list[list[np.ndarray]] = []
    for t in range(steps):
        outputs, states = step([s[:, t] for s in seqs], consts, states)
        stepped.append(outputs)
    for k in range(len(model.layout.sequence_outputs)):
        np.testing.assert_allclose(
            np.stack([o[k] for o in stepped], axis=1), whole_outputs[k], atol=1e-4
        )
    for k in range(len(model.layout.sequence_outputs), n_out):
        np.testing.assert_allclose(stepped[-1][k], whole_outputs[k], atol=1e-4)
    for got, want in zip(states, whole_states, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)

    # 2. The layer itself on random chunks, passing the states along.
    cuts = sorted(
        set(data.draw(st.lists(st.integers(1, max(steps - 1, 1)), max_size=3), label="cuts"))
    )
    bounds = [0, *[c for c in cuts if c < steps], steps]
    states = start
    chunks = []
    for lo, hi in itertools.pairwise(bounds):
        result = [
            _np(v)
            for v in model(
                [s[:, lo:hi] for s in seqs], initial_state=states, constants=consts or None
            )
        ]
        chunks.append(result[:n_out])
        states = result[n_out:]
    for k in range(len(model.layout.sequence_outputs)):
        np.testing.assert_allclose(
            np.concatenate([c[k] for c in chunks], axis=1), whole_outputs[k], atol=1e-4
        )
    for got, want in zip(states, whole_states, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(spec=GRAPH_SPECS, data=st.data())
def test_whole_sequence_equals_steps_equals_chunks(spec: dict, data: st.DataObject) -> None:
    _check_invariant(build_step_graph(spec), data)


@_SETTINGS
@given(spec=KERAS_SPECS, data=st.data())
def test_invariant_holds_for_converted_keras_models(spec: dict, data: st.DataObject) -> None:
    _check_invariant(build_keras_model(spec), data)


# -- the JAX backend ---------------------------------------------------------------

_JAX_SCRIPT = textwrap.dedent(
    """
    import os, tempfile
    import keras, numpy as np
    assert keras.backend.backend() == "jax"
    from rnnserve.core import RecurrentModel, RecurrentSequential, StepFunction, from_keras
    L = keras.layers
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    model = keras.Sequential([keras.Input((None, 4)), L.LSTM(6, return_sequences=True), L.Dense(2)])
    rnn = from_keras(model)
    np.testing.assert_allclose(np.asarray(rnn(x)), np.asarray(model(x)), atol=1e-5)
    step = StepFunction(rnn, max_batch_size=4)
    states = step.signature.initial_states(3)
    outs = []
    for t in range(5):
        o, states = step([x[:, t]], [], states)
        outs.append(o[0])
    np.testing.assert_allclose(np.stack(outs, 1), np.asarray(model(x)), atol=1e-5)
    assert step.compiled_buckets == {4}
    stack = RecurrentSequential([L.GRUCell(3), L.Dense(4)], readout="add", return_sequences=True)
    inputs = keras.Input((None, 4))
    saved = keras.Model(inputs, L.Bidirectional(stack)(inputs))
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    saved.save(path)
    np.testing.assert_array_equal(np.asarray(keras.models.load_model(path)(x)), np.asarray(saved(x)))
    c = keras.Input((2,)); h = keras.Input((3,))
    h_t = L.Dense(3, activation="tanh")(L.concatenate([c, h]))
    dec = RecurrentModel(constant_inputs=c, state_inputs=h, sequence_outputs=h_t, state_outputs=h_t, output_length=4, return_sequences=True)
    assert dec(rng.normal(size=(5, 2)).astype("float32")).shape == (5, 4, 3)
    print("jax ok")
    """
)


def _run_script(script: str, cwd: Path, **env: str) -> str:
    """Run `script` in a fresh interpreter (backends and thread pools are per process)."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(find_spec("jax") is None, reason="jax is not installed")
def test_core_runs_under_the_jax_backend(tmp_path: Path) -> None:
    out = _run_script(_JAX_SCRIPT, tmp_path, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    assert "jax ok" in out


_THREADS_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    from rnnserve.core import set_compute_threads

    assert set_compute_threads(1)  # before the runtime starts: applied
    assert tf.config.threading.get_intra_op_parallelism_threads() == 1
    tf.constant(np.ones(3)) + 1  # the runtime starts
    assert set_compute_threads(1)  # what is set already: fine
    assert not set_compute_threads(3)  # too late to change: refused, not raised
    print("threads ok")
    """
)


def test_set_compute_threads_before_and_after_start(tmp_path: Path) -> None:
    assert "threads ok" in _run_script(_THREADS_SCRIPT, tmp_path, KERAS_BACKEND="tensorflow")
