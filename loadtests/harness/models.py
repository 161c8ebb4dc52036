"""The benchmark models, written as an rnnserve model repository.

`lstm256` is the reference (LSTM(256) over 64 features + Dense(64), the model of
`bench_core.py` and `bench_engine.py`); `gru256` swaps the LSTM for a GRU; `stacked` is a
small two-layer model (LSTM(64) -> GRU(64) -> Dense(64)); `lstm1024` (LSTM(1024) over 256
features + Dense(256)) is the GPU model of issue 6, written only when asked for. Weights are seeded, so every peer
(including the Triton peer, via `triton_peer/export_weights.py`) computes the same thing.
"""

from __future__ import annotations

from pathlib import Path

FEATURES = 64
OUTPUTS = 64
MODELS = ("lstm256", "gru256", "stacked")
# (input features, outputs) per model; the load generator sizes its steps from it.
SHAPES = {"lstm256": (64, 64), "gru256": (64, 64), "stacked": (64, 64), "lstm1024": (256, 256)}


def features(name: str) -> int:
    return SHAPES[name][0]


def build(name: str):  # -> keras.Model
    import keras

    keras.utils.set_random_seed(0)
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark model {name!r}; one of {sorted(SHAPES)}")
    n_in, n_out = SHAPES[name]
    layers: list = [keras.Input((None, n_in), name="x")]
    if name == "lstm256":
        layers.append(keras.layers.LSTM(256, return_sequences=True, name="lstm"))
    elif name == "gru256":
        layers.append(keras.layers.GRU(256, return_sequences=True, name="gru"))
    elif name == "stacked":
        layers.append(keras.layers.LSTM(64, return_sequences=True, name="lstm"))
        layers.append(keras.layers.GRU(64, return_sequences=True, name="gru"))
    else:  # lstm1024
        layers.append(keras.layers.LSTM(1024, return_sequences=True, name="lstm"))
    layers.append(keras.layers.Dense(n_out, name="y"))
    return keras.Sequential(layers, name=name)


def write_repository(root: Path, names: tuple[str, ...] = MODELS) -> Path:
    """`root/<name>/1/model.keras` for each model (skipped when already there)."""
    for name in names:
        path = root / name / "1" / "model.keras"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        build(name).save(path)
    return root
