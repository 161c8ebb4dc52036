"""Bearer-token authentication: each token maps to the namespace its sessions live in.

The interceptor asks `TokenAuth.namespace_for(metadata)` once per call (health probes
excepted); the namespace becomes the call's context (`call_context.namespace_var`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rnnserve.service.errors import InvalidArgument, Unauthenticated

__all__ = ["TokenAuth"]


class TokenAuth:
    """Bearer tokens, each mapped to the namespace its sessions live in."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        if not tokens:
            raise InvalidArgument("auth is enabled but no token is configured")
        self._tokens = dict(tokens)

    @classmethod
    def from_settings(cls, tokens_file: Path | None, tokens: str | None) -> TokenAuth | None:
        """`token namespace` lines in a file and/or `token=namespace,...`; None: no auth."""
        pairs: dict[str, str] = {}
        if tokens_file is not None:
            for number, line in enumerate(tokens_file.read_text().splitlines(), start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise InvalidArgument(f"{tokens_file}:{number}: expected `token namespace`")
                pairs[parts[0]] = parts[1]
        for item in (tokens or "").split(","):
            if item.strip():
                token, sep, namespace = item.strip().partition("=")
                if not sep or not token or not namespace:
                    raise InvalidArgument("auth tokens: expected `token=namespace,...`")
                pairs[token] = namespace
        return cls(pairs) if pairs else None

    def namespace_for(self, metadata: Any) -> str:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        namespace = self._tokens.get(token.strip())
        if namespace is None:
            raise Unauthenticated("unknown token")
        return namespace
