"""A small character-level LSTM: trained in seconds, served step by step.

    python -m rnnserve.core.demo

Trains an ordinary Keras model on a built-in text, converts it to step form
with `from_keras`, checks that stepping it one character at a time through a
compiled `StepFunction` gives the whole-sequence outputs, and generates text.
The server's `demo-model` command writes this same model to a repository.
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from rnnserve.core._container import RecurrentModel
from rnnserve.core._convert import from_keras
from rnnserve.core._step import StepFunction

TEXT = (
    "a recurrent network reads a sequence one step at a time and carries a state "
    "from each step to the next. serving such a model means keeping that state "
    "between requests: every session sends its next step, the server batches the "
    "steps of many sessions into one call, and the state of each session waits in "
    "a store until its next step arrives. "
) * 8
VOCABULARY = sorted(set(TEXT))


def encode(text: str) -> np.ndarray:
    index = {ch: i for i, ch in enumerate(VOCABULARY)}
    return np.array([index.get(ch, 0) for ch in text], dtype="int32")


def decode(tokens: np.ndarray) -> str:
    return "".join(VOCABULARY[int(t)] for t in tokens)


def build_char_lstm(units: int = 64, embedding: int = 16) -> keras.Model:
    vocab = len(VOCABULARY)
    return keras.Sequential(
        [
            keras.Input((None,), dtype="int32", name="chars"),
            keras.layers.Embedding(vocab, embedding, name="embed"),
            keras.layers.LSTM(units, return_sequences=True, name="lstm"),
            keras.layers.Dense(vocab, name="logits"),
        ],
        name="char_lstm",
    )


def train_char_lstm(epochs: int = 3, window: int = 40, seed: int = 0) -> keras.Model:
    """A `keras.Sequential` char-LSTM trained on `TEXT` (next-character prediction)."""
    keras.utils.set_random_seed(seed)
    tokens = encode(TEXT)
    starts = np.arange(0, len(tokens) - window - 1, 3)
    x = np.stack([tokens[s : s + window] for s in starts])
    y = np.stack([tokens[s + 1 : s + window + 1] for s in starts])
    model = build_char_lstm()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


def generate(step: StepFunction, prompt: str, length: int) -> str:
    """Greedy generation: feed the prompt, then each predicted character back in."""
    states = step.signature.initial_states(1)
    outputs: list[np.ndarray] = []
    for token in encode(prompt):
        outputs, states = step([np.array([token], dtype="int32")], [], states)
    produced = []
    for _ in range(length):
        token = int(np.argmax(outputs[0][0]))
        produced.append(token)
        outputs, states = step([np.array([token], dtype="int32")], [], states)
    return decode(np.array(produced))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prompt", default="serving such a model ")
    args = parser.parse_args()

    started = time.perf_counter()
    model = train_char_lstm(epochs=args.epochs)
    print(f"trained {model.name} in {time.perf_counter() - started:.1f}s")

    recurrent: RecurrentModel = from_keras(model)
    step = StepFunction(recurrent, max_batch_size=8)
    print("step signature:")
    for role, specs in step.signature.to_dict().items():
        for spec in specs:
            print(f"  {role:9s} {spec['name']:12s} {spec['dtype']:8s} {tuple(spec['shape'])}")

    sample = encode(args.prompt)[None, :]
    whole = keras.ops.convert_to_numpy(model(sample))
    states = step.signature.initial_states(1)
    stepped = []
    for t in range(sample.shape[1]):
        outputs, states = step([sample[:, t]], [], states)
        stepped.append(outputs[0])
    difference = float(np.abs(np.stack(stepped, axis=1) - whole).max())
    print(
        f"whole sequence vs {sample.shape[1]} compiled steps: max |difference| = {difference:.2e}"
    )
    print(f"generated: {args.prompt!r} -> {generate(step, args.prompt, 60)!r}")


if __name__ == "__main__":
    main()
