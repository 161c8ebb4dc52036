"""What the start log prints of the settings (secrets as ***) and which stderr lines
of TensorFlow's import it drops (service/settings.py, service/logs.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from rnnserve.service.logs import drop_native_info
from rnnserve.service.settings import Settings, redact_url


def test_changed_lists_only_settings_off_their_defaults_with_secrets_hidden() -> None:
    settings = Settings(
        port=9000,
        max_batch_size=256,  # the default, given explicitly: not a change
        auth_tokens="tok1=a,tok2=b",
        redis_url="redis://user:hunter2@redis:6379/0",
    )
    assert settings.changed() == {
        "port": "9000",
        "auth_tokens": "***",
        "redis_url": "redis://user:***@redis:6379/0",
    }
    assert Settings().changed() == {}


def test_redact_url() -> None:
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert redact_url("redis://:pw@redis:6379") == "redis://:***@redis:6379"
    assert redact_url("rediss://u:p%40ss@h:1/2") == "rediss://u:***@h:1/2"
    assert redact_url("redis://h:1/0?password=pw&db=3") == "redis://h:1/0?password=***&db=3"


NOISE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796311466.026714   17382 port.cc:153] oneDNN custom operations are on.\n"
    b"I0000 00:00:1796311466.027295   17382 cudart_stub.cc:31] Could not find cuda drivers on "
    b"your machine, GPU will not be used.\n"
    b"I0000 00:00:1796311475.606615   17504 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions in performance-critical operations.\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.\n"
    b"2026-12-03 15:13:05.123456: I tensorflow/core/util/port.cc:113] oneDNN custom ops.\n"
)


def test_native_info_lines_are_dropped_and_the_rest_kept_in_order() -> None:
    kept = (
        b"E0000 00:00:1796311479.513591   17504 cuda_platform.cc:52] failed call to cuInit\n"
        b"/x/y.py:3: UserWarning: something\n"
        b"W0000 00:00:1796311479.513591   17504 a.cc:1] a warning\n"
        b"Traceback (most recent call last):\n"
    )
    assert drop_native_info(NOISE) == b""
    assert drop_native_info(NOISE + kept) == kept
    # A warning between two INFO records stays where it was.
    lines = NOISE.splitlines(keepends=True)
    between = b"W0000 00:00:1.0   1 a.cc:1] between\n"
    assert drop_native_info(b"".join([lines[1], between, lines[2]])) == between
    assert drop_native_info(b"plain text without newline") == b"plain text without newline"


def test_quiet_native_imports_filters_fd_2_and_passes_everything_at_debug() -> None:
    """A child writing to fd 2 directly (as absl does) inside the block."""
    code = (
        "import os, sys\n"
        "from rnnserve.service.logs import quiet_native_imports\n"
        f"noise = {NOISE!r}\n"
        "with quiet_native_imports(sys.argv[1] == 'quiet'):\n"
        "    os.write(2, noise)\n"
        "    print('from python', file=sys.stderr)\n"
        "    os.write(2, b'E0000 00:00:1.0   1 a.cc:1] an error\\n')\n"
        "print('after', file=sys.stderr)\n"
    )
    for mode in ("quiet", "debug"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, timeout=60, env=os.environ
        )
        assert done.returncode == 0, done.stderr
        if mode == "quiet":
            assert done.stderr == b"from python\nE0000 00:00:1.0   1 a.cc:1] an error\nafter\n"
        else:
            assert done.stderr.startswith(NOISE)


def test_third_party_loggers_log_from_warning_ours_from_the_level() -> None:
    from rnnserve.service.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("rnnserve").level
    try:
        configure_logging("INFO")
        assert not logging.getLogger("tensorflow").isEnabledFor(logging.INFO)
        assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
        assert logging.getLogger("rnnserve.service.server").isEnabledFor(logging.INFO)
        configure_logging("DEBUG")  # nothing held back
        assert logging.getLogger("tensorflow").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], level, own = saved
        root.setLevel(level)
        logging.getLogger("rnnserve").setLevel(own)
