"""Models for tests, one place each: the test repository's models and the demo model.

write_repository(root)     # root/lstm/1, root/ctx/1
write_char_lstm(root)      # root/char_lstm/1, an untrained demo char-LSTM
"""

from __future__ import annotations

from pathlib import Path

import keras


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
