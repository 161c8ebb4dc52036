"""`Settings`: every knob of the server, typed, from `RNNSERVE_*` env vars and CLI flags.

Built once in `main` (the CLI) and passed down; nothing reads the environment at
import time. The README's configuration table lists these fields.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings. Env: `RNNSERVE_<FIELD>` (e.g. `RNNSERVE_PORT=8001`)."""

    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", extra="ignore", frozen=True)

    # -- network ---------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address the gRPC server binds")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    reuse_port: bool = Field(
        False, description="SO_REUSEPORT: several server processes share the port (Redis store)"
    )
    acceptors: int = Field(
        2,
        ge=1,
        le=16,
        description="gRPC servers in this process on the one port (SO_REUSEPORT between "
        "them; a port another process holds is still refused): each admits new calls on "
        "its own, so more unary calls reach a batch at once",
    )
    processes: int = Field(
        1,
        ge=0,
        description="server processes on the port (N > 1: a supervisor starts N with "
        "SO_REUSEPORT and serves one /metrics; needs the Redis store); 0: one per usable CPU",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port (unset: no endpoint)"
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest gRPC message received or sent"
    )
    grace_period_s: float = Field(
        20.0, ge=0, description="on SIGTERM: seconds to finish in-flight requests"
    )

    # -- models ----------------------------------------------------------------------
    model_repository: Path = Field(
        Path("models"), description="folder of <name>/<version>/model.keras"
    )
    repository_poll_s: float = Field(
        0.0, ge=0, description="re-scan the repository every N seconds (0: only at start)"
    )
    max_batch_size: int = Field(256, ge=1, description="default largest batch per model call")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, description="default wait for more steps before running a batch"
    )
    max_queue_size: int = Field(8192, ge=1, description="default queued steps per model version")
    max_sequence_length: int = Field(
        10_000, ge=1, description="default most steps in one RunSequence call"
    )
    idle_timeout_s: float = Field(
        3600.0, gt=0, description="default seconds before an idle session expires"
    )
    state_dtype: Literal["float32", "float16"] = Field(
        "float32", description="default dtype of stored float states"
    )
    nonfinite_inputs: Literal["allow", "reject"] = Field(
        "reject", description="NaN/Inf in float inputs, constants, initial states: reject or allow"
    )
    warmup: bool = Field(True, description="compile every batch bucket before serving")
    compute_process: bool = Field(
        False,
        description="run each model version's step in a child process of its own, fed "
        "through shared memory: the event loop never shares its GIL with the model's "
        "Python (one more process and model copy per version)",
    )
    compute_threads: int = Field(
        0,
        ge=0,
        description="CPU threads one model step may use (TensorFlow intra-op); 0: one less "
        "than the CPUs this process may use (affinity and cgroup CPU limit; with several "
        "processes, its share of them), at least 1 (the event loop keeps a core)",
    )

    health_check_s: float = Field(
        2.0,
        gt=0,
        description="how often health is re-checked: SERVING only while a model is loaded "
        "and the state store answers (a store that does not answer at start is waited for)",
    )

    # -- state store -----------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://host:port/db; unset: the embedded memory store"
    )
    redis_cluster: bool = Field(
        False, description="redis_url is a node of a Redis Cluster (Redis >= 7)"
    )
    redis_sentinel: str | None = Field(
        None,
        description="host:port,... of Redis Sentinels (with redis_service; instead of "
        "redis_url): the master is the one a majority of them agree on",
    )
    redis_service: str | None = Field(
        None, description="the master's name the Sentinels monitor (with redis_sentinel)"
    )
    redis_min_replicas_ack: int = Field(
        0,
        ge=0,
        description="replicas every write must reach (WAIT N, in the write's round trip) "
        "before a step is acknowledged; fewer within the timeout: UNAVAILABLE. 0: none "
        "waited for (a failover may lose acknowledged steps)",
    )
    redis_replicas_ack_timeout_ms: int = Field(
        250,
        ge=1,
        description="how long a write waits for redis_min_replicas_ack replicas; below "
        "redis_timeout_s",
    )
    redis_timeout_s: float = Field(
        2.0,
        gt=0,
        description="socket timeout of one Redis command; a batch's whole store call is "
        "bounded at 2.5x this, then its steps fail UNAVAILABLE",
    )
    namespace: str = Field("default", description="key namespace when auth is off")

    # -- security --------------------------------------------------------------------
    auth_tokens_file: Path | None = Field(
        None, description="file of `token namespace` lines; enables bearer-token auth"
    )
    auth_tokens: str | None = Field(
        None, description="`token=namespace,...` (alternative to the file); enables auth"
    )
    tls_cert_file: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA of client certificates (PEM); enables mTLS"
    )

    # -- logging ---------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="least level logged; DEBUG also lets TensorFlow's native INFO lines "
        "through (otherwise dropped at import)",
    )
    log_json: bool = Field(False, description="one JSON object per log line")
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans for calls, queue waits and batches (needs "
        "`rnnserve[tracing]`; exported as the OTEL_* variables say); off: nothing of "
        "OpenTelemetry is imported",
    )

    # Shown as *** wherever settings are printed (the start log).
    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"auth_tokens"})
    URL_FIELDS: ClassVar[frozenset[str]] = frozenset({"redis_url"})

    def changed(self) -> dict[str, str]:
        """Every setting that differs from its default, as printed (secrets as ***)."""
        out: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value == info.get_default(call_default_factory=True):
                continue
            out[name] = self.shown(name, value)
        return out

    def shown(self, name: str, value: Any) -> str:
        """`value` of setting `name` as it may be printed."""
        if value is None:
            return "unset"
        if name in self.SECRET_FIELDS:
            return "***"
        if name in self.URL_FIELDS:
            return redact_url(str(value))
        return str(value)

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("mTLS (tls_client_ca_file) needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _store_settings(self) -> Settings:
        if (self.redis_sentinel is None) != (self.redis_service is None):
            raise ValueError("redis_sentinel and redis_service go together")
        if self.redis_sentinel is not None:
            from rnnserve.service.store._sentinel import parse_sentinels

            parse_sentinels(self.redis_sentinel)  # names a bad address
            if self.redis_url is not None:
                raise ValueError("give redis_url or redis_sentinel, not both")
            if self.redis_cluster:
                raise ValueError("redis_cluster takes redis_url (a node), not redis_sentinel")
        if self.redis_min_replicas_ack and self.redis_url is None and self.redis_sentinel is None:
            raise ValueError(
                "redis_min_replicas_ack needs a Redis store (redis_url or redis_sentinel): "
                "the memory store has no replicas"
            )
        if self.redis_replicas_ack_timeout_ms >= self.redis_timeout_s * 1000:
            raise ValueError(
                f"redis_replicas_ack_timeout_ms ({self.redis_replicas_ack_timeout_ms}) must be "
                f"below redis_timeout_s ({self.redis_timeout_s:g} s): the socket would time "
                "out before WAIT answers"
            )
        return self


def auto_compute_threads(cpus: int, processes: int = 1) -> int:
    """`compute_threads=0`: one less than a process's share of `cpus` (its event loop
    keeps a core), at least 1. `cpus` is `available_cpus()`: in a pod, its CPU limit."""
    return max(1, cpus // processes - 1)


def redact_url(url: str) -> str:
    """`url` with its password (in the authority or a `password=` query) as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode(
                [(key, "***" if key == "password" else value) for key, value in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class OptionRow:
    """One line of `rnnserve serve --help`."""

    flag: str
    kind: str
    env: str
    default: str | None
    description: str


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _described(description: str, annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return f"{description} [{'|'.join(map(str, typing.get_args(annotation)))}]"
    return description


def option_rows() -> list[OptionRow]:
    """Every setting as a flag, with its env variable and default, in declaration order."""
    prefix = Settings.model_config.get("env_prefix", "")
    rows = []
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        rows.append(
            OptionRow(
                flag="--" + name.replace("_", "-"),
                kind=_kind(info.annotation),
                env=f"{prefix}{name}".upper(),
                default=None
                if default is None
                else str(default).lower()
                if isinstance(default, bool)
                else str(default),
                description=_described(info.description or "", info.annotation),
            )
        )
    return rows


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit, which the affinity mask does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a format we do not know
        pass
    return cpus
