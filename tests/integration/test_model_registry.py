"""The engine is the one registry of loaded models: what the repository loads, what the
servicers list and describe, and one default-version rule (the highest, unless pinned)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from _models import FEATURES

from rnnserve.core import StepFunction
from rnnserve.protocol.inference import grpc_service_pb2 as kserve_pb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kserve_grpc
from rnnserve.service.engine import SessionEngine, sorted_versions, version_key
from rnnserve.service.errors import ModelNotFound, ShuttingDown
from rnnserve.service.repository import ModelRepository
from rnnserve.service.settings import Settings
from rnnserve.service.store import MemoryStore
from tests.integration._grpc_util import pb, pb_grpc
from tests.models import FEATURES as SERVER_FEATURES
from tests.servers import ServerThread


def test_versions_sort_by_number_then_name() -> None:
    assert sorted_versions(["10", "2", "b", "1", "a"]) == ["1", "2", "10", "a", "b"]
    assert max(["9", "10", "2"], key=version_key) == "10"


async def test_default_is_the_highest_version_unless_pinned(
    lstm: tuple[object, StepFunction],
) -> None:
    _, step = lstm
    x = np.zeros(FEATURES, dtype="float32")
    async with SessionEngine(MemoryStore()) as engine:
        assert engine.models() == [] and engine.versions("lstm") == []
        with pytest.raises(ModelNotFound, match="'lstm' is not loaded"):
            engine.default_version("lstm")
        for version in ("2", "10", "1"):  # loaded out of order: the highest is the default
            engine.load_model("lstm", version, step)
        assert engine.models() == ["lstm"]
        assert engine.versions("lstm") == ["1", "2", "10"]
        assert engine.default_version("lstm") == "10"
        assert engine.loaded("lstm").version == "10"
        assert (await engine.start("lstm", "a")).version == "10"

        engine.set_default_version("lstm", "2")  # a pin outlives later loads
        engine.load_model("lstm", "11", step)
        assert engine.default_version("lstm") == "2"
        assert (await engine.start("lstm", "b")).version == "2"
        await engine.unload_model("lstm", "2")  # the pinned version goes: the rule again
        assert engine.default_version("lstm") == "11"
        assert engine.versions("lstm") == ["1", "10", "11"]

        engine.load_model("lstm", "3", step, default=True)  # load and pin at once
        assert engine.default_version("lstm") == "3"
        engine.set_default_version("lstm", None)
        assert engine.default_version("lstm") == "11"
        with pytest.raises(ModelNotFound, match="no version '2' loaded"):
            engine.set_default_version("lstm", "2")

        # A session keeps the version that started it, whatever the default is now.
        assert (await engine.step("lstm", "a", [x], version="10")).version == "10"
        for version in engine.versions("lstm"):
            await engine.unload_model("lstm", version)
        assert engine.models() == []
        with pytest.raises(ModelNotFound):
            engine.loaded("lstm")
        engine.load_model("lstm", "1", step)
        assert engine.default_version("lstm") == "1"
        runner = engine.loaded("lstm")
        assert (runner.path, runner.load_seconds) == (None, None)
    with pytest.raises(ShuttingDown):
        engine.runner("lstm")


@pytest.fixture
def versioned_repo(model_repo: Path, tmp_path: Path) -> Path:
    """`lstm` versions 1, 2 and 10 (copies of the test repository's `lstm/1`)."""
    for version in ("1", "2", "10"):
        shutil.copytree(model_repo / "lstm" / "1", tmp_path / "lstm" / version)
    return tmp_path


async def test_repository_sync_is_answered_by_the_engine(versioned_repo: Path) -> None:
    settings = Settings(model_repository=versioned_repo, warmup=False)
    async with SessionEngine(MemoryStore()) as engine:
        repository = ModelRepository(versioned_repo, engine, settings)
        changes = await repository.sync()
        assert sorted(line.split(" in ")[0] for line in changes) == [
            "loaded lstm/1",
            "loaded lstm/10",
            "loaded lstm/2",
        ]
        assert engine.versions("lstm") == ["1", "2", "10"]
        assert engine.default_version("lstm") == "10"
        ten = engine.loaded("lstm", "10")
        assert ten.path == versioned_repo / "lstm" / "10"
        assert ten.load_seconds is not None and ten.load_seconds > 0
        assert ten.config.max_batch_size == 64  # its config.yaml
        assert await repository.sync() == []  # nothing changed

        shutil.rmtree(versioned_repo / "lstm" / "10")
        (versioned_repo / "lstm" / "2" / "config.yaml").write_text("max_batch_size: 8\n")
        changes = await repository.sync()
        assert [line.split(" in ")[0] for line in changes] == [
            "unloaded lstm/2",
            "unloaded lstm/10",
            "loaded lstm/2",
        ]
        assert engine.versions("lstm") == ["1", "2"]
        assert engine.default_version("lstm") == "2"
        assert engine.loaded("lstm", "2").config.max_batch_size == 8

        # The folder is the truth: a version loaded by another hand is unloaded...
        engine.load_model("lstm", "7", engine.loaded("lstm", "1").step_fn)
        assert engine.default_version("lstm") == "7"
        assert await repository.sync() == ["unloaded lstm/7"]
        # ... and a pin set by a caller stays while its version is served.
        engine.set_default_version("lstm", "1")
        assert await repository.sync() == []
        assert engine.default_version("lstm") == "1"


@pytest.fixture
def versioned_server(versioned_repo: Path) -> Iterator[ServerThread]:
    settings = Settings(model_repository=versioned_repo, port=0, host="127.0.0.1", warmup=False)
    with ServerThread(settings) as running:
        yield running


def _infer(
    stub: kserve_grpc.GRPCInferenceServiceStub, version: str
) -> kserve_pb.ModelInferResponse:
    x = np.ones((1, SERVER_FEATURES), dtype="<f4")
    request = kserve_pb.ModelInferRequest(
        model_name="lstm",
        model_version=version,
        inputs=[
            kserve_pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[1, SERVER_FEATURES]
            )
        ],
        raw_input_contents=[x.tobytes()],
    )
    request.parameters["sequence_id"].string_param = f"registry-{version or 'default'}"
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True
    return stub.ModelInfer(request)


def test_servicers_read_the_engine(versioned_server: ServerThread, versioned_repo: Path) -> None:
    with grpc.insecure_channel(versioned_server.address) as channel:
        native = pb_grpc.RecurrentStub(channel)
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        (info,) = native.ListModels(pb.ListModelsRequest()).models
        assert (info.name, list(info.versions), info.default_version) == (
            "lstm",
            ["1", "2", "10"],
            "10",
        )
        assert native.GetModelSignature(pb.GetModelSignatureRequest(model="lstm")).version == "10"
        metadata = kserve.ModelMetadata(kserve_pb.ModelMetadataRequest(name="lstm"))
        assert list(metadata.versions) == ["1", "2", "10"]
        ready = kserve.ModelReady(kserve_pb.ModelReadyRequest(name="lstm", version="2"))
        assert ready.ready
        # The reply names the version and outputs of the step that ran.
        reply = _infer(kserve, "")
        assert (reply.model_name, reply.model_version) == ("lstm", "10")
        assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
            ("y", "FP32", [1, 3])
        ]
        assert _infer(kserve, "2").model_version == "2"

        shutil.rmtree(versioned_repo / "lstm" / "10")
        versioned_server.call(versioned_server.server.repository.sync())
        (info,) = native.ListModels(pb.ListModelsRequest()).models
        assert (list(info.versions), info.default_version) == (["1", "2"], "2")
        assert _infer(kserve, "").model_version == "2"
        ready = kserve.ModelReady(kserve_pb.ModelReadyRequest(name="lstm", version="10"))
        assert not ready.ready


def test_a_long_lived_client_follows_the_default_version(
    versioned_server: ServerThread, versioned_repo: Path
) -> None:
    """The SDK caches named versions' signatures only: after a rolling update (a new
    highest version, the old one unloaded) new sessions start on the new default."""
    from rnnserve.client import Client

    x = np.zeros(4, "float32")
    with Client(versioned_server.address) as client:
        before = client.session("lstm")
        assert before.version == "10"
        before.step(x)
        shutil.rmtree(versioned_repo / "lstm" / "10")
        versioned_server.call(versioned_server.server.repository.sync())
        after = client.session("lstm")
        assert after.version == "2"
        after.step(x)
        assert client.step_many("lstm", [after.session_id], x[None]).ok.all()
