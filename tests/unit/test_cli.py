"""The `rnnserve` command's own options."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.service.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"rnnserve {version('rnnserve')}\n"
    assert done.stderr == ""  # no import noise: the version needs no TensorFlow
