"""Small real Keras models for the engine tests (sizes of their own, built by
tests/models.py), and their offline references.

Importable by name from spawned worker processes (tests/integration is on sys.path).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from rnnserve.core import RecurrentModel, StepFunction, from_keras
from tests import models

FEATURES = 8
UNITS = 16
OUTPUTS = 4
CONSTANTS = 3


def lstm_model(seed: int = 7) -> keras.Model:
    """The engine tests' LSTM(16) + Dense(4) over 8 features, with fixed weights
    (`tests.models.lstm_model` at these sizes)."""
    return models.lstm_model(features=FEATURES, units=UNITS, outputs=OUTPUTS, seed=seed)


def constants_model(seed: int = 11) -> RecurrentModel:
    """A one-timestep graph with a constant input fed to every step (a tanh RNN)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((FEATURES,), name="x")
    c = keras.Input((CONSTANTS,), name="c")
    h = keras.Input((UNITS,), name="h")
    mixed = keras.layers.Add()(
        [keras.layers.Dense(UNITS)(x), keras.layers.Dense(UNITS)(c), keras.layers.Dense(UNITS)(h)]
    )
    h_new = keras.layers.Activation("tanh", name="h_new")(mixed)
    y = keras.layers.Dense(OUTPUTS, name="y")(h_new)
    return RecurrentModel(
        sequence_inputs=[x],
        constant_inputs=[c],
        state_inputs=[h],
        sequence_outputs=[y],
        state_outputs=[h_new],
        return_sequences=True,
    )


def step_function(model: keras.Model | RecurrentModel, max_batch_size: int = 256) -> StepFunction:
    return StepFunction(
        model if isinstance(model, RecurrentModel) else from_keras(model),
        max_batch_size=max_batch_size,
    )


def offline_run(
    step: StepFunction,
    inputs: np.ndarray,
    constants: list[np.ndarray] | None = None,
    states: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One session alone: `(T, features)` stepped with batch 1 -> outputs `(T, out)`, states."""
    states = step.signature.initial_states(1) if states is None else [s[None] for s in states]
    consts = [c[None] for c in (constants or [])]
    outputs = []
    for x in inputs:
        (out, *_), states = step([x[None]], consts, states)
        outputs.append(out[0])
    return np.stack(outputs), [s[0] for s in states]


def token_model(seed: int = 13, vocabulary: int = 20) -> keras.Model:
    """Integer tokens in (a per-step input of shape ()), Embedding + LSTM + Dense logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(vocabulary, 8),
            keras.layers.LSTM(UNITS, return_sequences=True),
            keras.layers.Dense(vocabulary),
        ]
    )
