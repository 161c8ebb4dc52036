"""The `rnnserve` command's own options."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.client.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"rnnserve {version('rnnserve')}\n"
    assert done.stderr == ""  # no import noise: the version needs no TensorFlow


def test_serve_help_lists_every_setting_with_its_env_variable_and_default() -> None:
    from rnnserve.service.settings import Settings

    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert "Usage: rnnserve serve [OPTIONS]" in out
    assert "╭─ Options" in out  # a rich panel, as typer draws the other commands' help
    rows: dict[str, str] = {}  # flag: its lines (a flag's help wraps onto the next ones)
    flag = ""
    for line in out.splitlines():
        if line.startswith("│  --"):
            flag = line.split()[1]
        if flag and line.startswith("│"):
            rows[flag] = rows.get(flag, "") + line
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in rows, flag
        assert f"[env var: RNNSERVE_{name.upper()}]" in rows[flag]
    assert "[default: 8001]" in rows["--port"]
    assert "<choice>" in rows["--state-dtype"] and "[float32|float16]" in rows["--state-dtype"]
    assert "[default: false]" in rows["--tracing"]
    assert "[default:" not in rows["--redis-url"]  # unset by default: no default shown
