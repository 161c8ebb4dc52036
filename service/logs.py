"""Logging setup: plain or one JSON object per line, each with the call's request id
(and, with tracing on, its trace id); and TensorFlow's native import noise dropped.

Imports nothing of the server but `tracing.py` (a leaf): the request id is a context
variable defined here, which the interceptor sets for each call (`call_context.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Final

from rnnserve.service import tracing

#: The request id of the call being served ("-" outside calls), on every log line.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rnnserve_request_id", default="-"
)

__all__ = ["JsonFormatter", "configure_logging", "drop_native_info", "quiet_native_imports"]

# Loggers whose INFO lines are ours; every other (third-party) logger logs from WARNING,
# except at DEBUG, where nothing is held back.
OWN_LOGGER: Final = "rnnserve"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.trace_id = tracing.current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level == "DEBUG" else max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger(OWN_LOGGER).setLevel(level)


# TensorFlow's native INFO records, written by absl straight to fd 2 at import whatever
# TF_CPP_MIN_LOG_LEVEL says: `I0000 00:00:1796311466.026714   17382 port.cc:153] oneDNN
# ...`, `... cudart_stub.cc:31] Could not find cuda drivers ...`, and the older
# `2026-12-03 15:13:05.123456: I tensorflow/...` form; absl's note about them.
_NATIVE_INFO: Final = re.compile(
    rb"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "  # before InitializeLog: 00:00:<epoch s>
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I \S+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
)
# The second line of the one two-line INFO record at import (cpu_feature_guard.cc).
_NATIVE_CONTINUATION: Final = re.compile(rb"To enable the following instructions: ")


def drop_native_info(data: bytes) -> bytes:
    """`data` without TensorFlow's native INFO records; every other line kept, in order."""
    kept: list[bytes] = []
    after_info = False
    for line in data.splitlines(keepends=True):
        if _NATIVE_INFO.match(line) or (after_info and _NATIVE_CONTINUATION.match(line)):
            after_info = True
            continue
        after_info = False
        kept.append(line)
    return b"".join(kept)


@contextlib.contextmanager
def quiet_native_imports(enabled: bool = True) -> Iterator[None]:
    """While the block runs (the import of TensorFlow), fd 2 goes to a file; at the end
    what was written there is written back in order, without TensorFlow's native INFO
    records. `enabled=False` (`--log-level DEBUG`): nothing is captured."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            data = drop_native_info(captured.read())
            while data:
                data = data[os.write(2, data) :]
