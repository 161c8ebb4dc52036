"""Models for tests, one place each: the test repository's models and the demo model.

lstm_model(seed=7)           # an ordinary Keras LSTM model (sizes are parameters)
write_repository(root)       # root/lstm/1, root/ctx/1
write_char_lstm(root)        # root/char_lstm/1, an untrained demo char-LSTM
reference(root, "lstm", xs)  # offline outputs to compare a server's with
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from rnnserve.core import RecurrentModel, from_keras

FEATURES = 4
UNITS = 8
OUTPUTS = 3
CONTEXT = 2


def lstm_model(
    *,
    features: int = FEATURES,
    units: int = UNITS,
    outputs: int = OUTPUTS,
    seed: int | None = None,
) -> keras.Model:
    """An ordinary Keras model: LSTM(units) over `features` + Dense(outputs), input `x`,
    output `y` (the repository's `lstm`: 4 -> 8 -> 3). `seed`: fixed weights."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((None, features), name="x"),
            keras.layers.LSTM(units, return_sequences=True, name="lstm"),
            keras.layers.Dense(outputs, name="y"),
        ],
        name="lstm_model",
    )


def context_model() -> keras.Model:
    """`ctx`: a step graph with a constant (per-session context) and a GRU cell."""
    x_t = keras.Input((FEATURES,), name="x")
    context = keras.Input((CONTEXT,), name="context")
    h = keras.Input((UNITS,), name="h")
    out, [h_t] = keras.layers.GRUCell(UNITS, name="gru")(
        keras.layers.concatenate([x_t, context]), [h]
    )
    y = keras.layers.Dense(OUTPUTS, name="y")(out)
    rnn = RecurrentModel(
        sequence_inputs=x_t,
        constant_inputs=context,
        state_inputs=h,
        sequence_outputs=y,
        state_outputs=h_t,
        return_sequences=True,
        name="ctx_rnn",
    )
    xs = keras.Input((None, FEATURES), name="xs")
    cs = keras.Input((CONTEXT,), name="cs")
    return keras.Model([xs, cs], rnn(xs, constants=[cs]), name="ctx_model")


def write_repository(root: Path, *, max_batch_size: int = 64) -> Path:
    """`root/lstm/1`, `root/ctx/1`: small trained-free models saved as `.keras`."""
    keras.utils.set_random_seed(42)
    for name, model in (("lstm", lstm_model()), ("ctx", context_model())):
        folder = root / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "model.keras")
        (folder / "config.yaml").write_text(
            f"max_batch_size: {max_batch_size}\nmax_queue_delay_ms: 2\n"
        )
    return root


def reference(repo: Path, name: str, xs: np.ndarray, constants: Any = None) -> np.ndarray:
    """Offline outputs `(batch, time, OUTPUTS)` of model `name` on sequences `xs`."""
    model = keras.models.load_model(repo / name / "1" / "model.keras", compile=False)
    recurrent = model if isinstance(model, RecurrentModel) else from_keras(model)
    if recurrent.layout.n_constants:
        # The saved model wraps the RecurrentModel; run its layer directly.
        layer = next(lyr for lyr in model.layers if isinstance(lyr, RecurrentModel))
        return np.asarray(keras.ops.convert_to_numpy(layer(xs, constants=[constants])))
    return np.asarray(keras.ops.convert_to_numpy(recurrent(xs)))


def write_char_lstm(root: Path, *, seed: int = 3) -> Path:
    """`root/char_lstm/1`: a small untrained demo char-LSTM with the `config.yaml` that
    `rnnserve demo-model` writes (its vocabulary as signature metadata)."""
    from rnnserve.core.demo import build_char_lstm
    from rnnserve.service.cli import write_char_config

    keras.utils.set_random_seed(seed)
    folder = root / "char_lstm" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    build_char_lstm(units=16, embedding=8).save(folder / "model.keras")
    write_char_config(folder)
    return root
