"""The per-call context that servicers and log lines read: the caller's namespace and
the call's request id (both set by the interceptor before a handler runs).

The request id variable itself belongs to `logs.py` (which imports nothing of the
server); this module is where the server sets it.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
from typing import Any

from rnnserve.service.logs import request_id_var

__all__ = ["namespace_var", "new_request_id", "request_id_var"]

namespace_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rnnserve_namespace", default="default"
)

_ID_PREFIX = secrets.token_hex(4) + "-"
_ids = itertools.count(1)


def new_request_id(metadata: Any) -> str:
    """The call's request id: the client's `x-request-id` (at most 128 characters), else
    one unique in this process."""
    for key, value in metadata or ():
        if key == "x-request-id":
            text = value if isinstance(value, str) else value.decode()
            return text[:128]
    # Unique per process without a syscall per call (uuid4 reads os.urandom).
    return f"{_ID_PREFIX}{next(_ids):x}"
