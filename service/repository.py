"""The model repository: `<root>/<name>/<version>/model.keras` (+ `config.yaml`).

    models/
      char_lstm/
        1/model.keras
        2/model.keras
        2/config.yaml        # optional: max_batch_size, idle_timeout_s, state_dtype...

Every version found is loaded, warmed and handed to the engine, which is the one
registry of what is loaded and picks a model's default: its highest version
(numerically when versions are numbers; `engine.version_key`). `sync()` makes the
engine match the folder: new versions load, removed ones unload, a changed
`model.keras` or `config.yaml` reloads. The server calls it at start and, with
`repository_poll_s`, on a timer: models change without a restart. The repository
itself keeps only the fingerprint of each folder it loaded, to see it change.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rnnserve.core import RecurrentModel, StepFunction, from_keras
from rnnserve.service.compute import ComputeProcess
from rnnserve.service.engine import RunnerConfig, SessionEngine
from rnnserve.service.errors import InvalidArgument
from rnnserve.service.metrics import model_loaded, model_unloaded
from rnnserve.service.settings import Settings

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelConfigFile(BaseModel):
    """`config.yaml` of one model version; unset fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, le=65536)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    max_sequence_length: int | None = Field(None, ge=1)
    idle_timeout_s: float | None = Field(None, gt=0)
    state_dtype: Literal["float32", "float16"] | None = None
    warmup: bool | None = None
    #: Free-form strings sent with the signature (ModelSignature.metadata).
    metadata: dict[str, str] = Field(default_factory=dict)

    def runner_config(self, settings: Settings) -> RunnerConfig:
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return RunnerConfig(
            max_batch_size=pick(self.max_batch_size, settings.max_batch_size),
            max_queue_delay_s=pick(self.max_queue_delay_ms, settings.max_queue_delay_ms) / 1000,
            max_queue_size=pick(self.max_queue_size, settings.max_queue_size),
            max_sequence_length=pick(self.max_sequence_length, settings.max_sequence_length),
            idle_timeout_s=pick(self.idle_timeout_s, settings.idle_timeout_s),
            states_float16=pick(self.state_dtype, settings.state_dtype) == "float16",
            reject_nonfinite=settings.nonfinite_inputs == "reject",
            metadata=dict(self.metadata),
        )


Fingerprint = tuple[float, ...]


def _fingerprint(folder: Path) -> Fingerprint:
    stamps = []
    for name in (MODEL_FILE, CONFIG_FILE):
        path = folder / name
        stamps += [path.stat().st_mtime_ns, path.stat().st_size] if path.exists() else [0, 0]
    return tuple(float(s) for s in stamps)


def read_config(folder: Path) -> ModelConfigFile:
    path = folder / CONFIG_FILE
    if not path.exists():
        return ModelConfigFile()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return ModelConfigFile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from exc


def load_step_function(path: Path, max_batch_size: int, *, warmup: bool) -> StepFunction:
    """Load a `.keras` file (a RecurrentModel inside, or an ordinary RNN model) as a step."""
    import keras

    model = keras.models.load_model(path, compile=False)
    recurrent = model if isinstance(model, RecurrentModel) else from_keras(model)
    step = StepFunction(recurrent, max_batch_size=max_batch_size)
    if warmup:
        step.warmup()
    return step


class ModelRepository:
    """Scans the repository folder and keeps the engine's loaded models in step with it."""

    def __init__(
        self, root: Path, engine: SessionEngine, settings: Settings, *, compute_threads: int = 1
    ) -> None:
        self.root = root
        self.engine = engine
        self.settings = settings
        self.compute_threads = compute_threads  # a compute process's TensorFlow threads
        # The folder of each version this repository loaded, as it was then.
        self._fingerprints: dict[tuple[str, str], Fingerprint] = {}
        self._lock = asyncio.Lock()

    def scan(self) -> dict[tuple[str, str], Path]:
        """`(name, version) -> folder` for every version folder holding a model file."""
        found: dict[tuple[str, str], Path] = {}
        if not self.root.is_dir():
            raise InvalidArgument(f"model repository {self.root} is not a folder")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not _NAME.match(model_dir.name):
                logger.warning("skipping %s: not a valid model name", model_dir)
                continue
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if (version_dir / MODEL_FILE).is_file() and _NAME.match(version_dir.name):
                    found[(model_dir.name, version_dir.name)] = version_dir
        return found

    async def sync(self) -> list[str]:
        """Load, reload and unload so the engine serves what the folder holds.

        Returns a line per change. A version that fails to load is logged and
        skipped (the others still load); it is retried at the next sync. A version
        the engine serves that this repository did not load from its folder as it is
        now (removed, changed, or loaded by another hand) is unloaded.
        """
        async with self._lock:
            changes: list[str] = []
            wanted = self.scan()
            engine = self.engine
            for name in engine.models():
                for version in engine.versions(name):
                    folder = wanted.get((name, version))
                    loaded_from = self._fingerprints.get((name, version))
                    if folder is None or _fingerprint(folder) != loaded_from:
                        await self._unload(name, version)
                        changes.append(f"unloaded {name}/{version}")
            for (name, version), folder in sorted(wanted.items()):
                if version in engine.versions(name):
                    continue
                try:
                    seconds = await self._load(name, version, folder)
                except Exception as exc:  # one line; the traceback at DEBUG
                    logger.error(
                        "could not load model %s version %s: %s: %s",
                        name, version, type(exc).__name__, exc,
                    )  # fmt: skip
                    logger.debug("the load of %s/%s failed", name, version, exc_info=True)
                    continue
                changes.append(f"loaded {name}/{version} in {seconds:.1f}s")
            return changes

    async def _load(self, name: str, version: str, folder: Path) -> float:
        started = time.perf_counter()
        fingerprint = _fingerprint(folder)
        file_config = read_config(folder)
        config = file_config.runner_config(self.settings)
        warmup = self.settings.warmup if file_config.warmup is None else file_config.warmup
        remote = self.settings.compute_process
        step = await asyncio.to_thread(
            load_step_function,
            folder / MODEL_FILE,
            config.max_batch_size,
            warmup=warmup and not remote,  # the compute process warms its own copy
        )
        compute = None
        if remote:
            compute = ComputeProcess(
                folder / MODEL_FILE,
                step.signature,
                max_batch_size=config.max_batch_size,
                slots=config.max_batches_in_flight,
                warmup=warmup,
                threads=self.compute_threads,
                name=f"{name}:{version}",
            )
            await compute.start()
        seconds = time.perf_counter() - started
        try:
            self.engine.load_model(
                name,
                version,
                step,
                config=config,
                path=folder,
                load_seconds=seconds,
                compute=compute,
            )
        except BaseException:
            if compute is not None:
                await compute.aclose()
            raise
        self._fingerprints[(name, version)] = fingerprint
        model_loaded(name, version, seconds)
        logger.info("loaded model %s version %s in %.1fs", name, version, seconds)
        return seconds

    async def _unload(self, name: str, version: str) -> None:
        self._fingerprints.pop((name, version), None)
        await self.engine.unload_model(name, version)
        model_unloaded(name, version)
        logger.info("unloaded model %s version %s", name, version)

    async def poll(self, interval_s: float) -> None:
        """Re-sync every `interval_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                for line in await self.sync():
                    logger.info("repository: %s", line)
            except Exception:
                logger.exception("repository sync failed")
