"""Writes the reference model's weights (seeded, as rnnserve's benchmark serves it) as .npz.

    .venv/bin/python loadtests/triton_peer/export_weights.py OUT.npz

Checks first that the plain-numpy LSTM step the Triton peer implements (in TF) gives the
Keras model's outputs, so both servers compute the same thing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from loadtests.harness.models import build


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def main() -> None:
    model = build("lstm256")
    lstm, dense = model.get_layer("lstm"), model.get_layer("y")
    kernel, recurrent, bias = (np.asarray(w) for w in lstm.get_weights())
    dense_kernel, dense_bias = (np.asarray(w) for w in dense.get_weights())
    xs = np.random.default_rng(0).normal(size=(3, 5, kernel.shape[0])).astype("float32")
    expected = np.asarray(model(xs))
    h = np.zeros((3, recurrent.shape[0]), np.float32)
    c = np.zeros_like(h)
    for t in range(xs.shape[1]):
        i, f, g, o = np.split(xs[:, t] @ kernel + h @ recurrent + bias, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        np.testing.assert_allclose(h @ dense_kernel + dense_bias, expected[:, t], atol=1e-4)
    np.savez(
        sys.argv[1],
        kernel=kernel,
        recurrent_kernel=recurrent,
        bias=bias,
        dense_kernel=dense_kernel,
        dense_bias=dense_bias,
    )


if __name__ == "__main__":
    main()
