"""The call metrics' `model` label: read from every request that names a model, of both
services, and bounded to the loaded models (`interceptor.model_named`, `interceptor.model_label`)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from rnnserve.protocol.inference import grpc_service_pb2
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2
from rnnserve.service.interceptor import model_label, model_named
from rnnserve.service.metrics import UNKNOWN_MODEL

# The calls that name no model: their `model` label is empty.
NAME_NO_MODEL = {
    "rnnserve.v1.Recurrent.ListModels",
    "inference.GRPCInferenceService.ServerLive",
    "inference.GRPCInferenceService.ServerReady",
    "inference.GRPCInferenceService.ServerMetadata",
}
# Where a request names its model (the value each string field gets below is its path).
MODEL_FIELDS = {"model", "model_name", "name", "session.model"}

METHODS = [
    method
    for descriptor in (recurrent_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR)
    for service in descriptor.services_by_name.values()
    for method in service.methods
]


def _filled(descriptor: Any, prefix: str = "") -> Any:
    """A message with every string field, also in singular sub-messages, set to its path."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.label == FieldDescriptor.LABEL_REPEATED:
            continue
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, path)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not descriptor:
            getattr(message, field.name).CopyFrom(_filled(field.message_type, path + "."))
    return message


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_every_request_that_names_a_model_is_read(method: Any) -> None:
    named = model_named(_filled(method.input_type))
    if method.full_name in NAME_NO_MODEL:
        assert named == ""
    else:
        assert named in MODEL_FIELDS, (method.full_name, named)


def test_the_label_is_a_loaded_model_unknown_or_empty() -> None:
    loaded = {"lstm"}.__contains__
    assert model_label("lstm", loaded) == "lstm"
    assert model_label("any-name-a-client-sends", loaded) == UNKNOWN_MODEL
    assert model_label("", loaded) == ""
    assert model_label("lstm", None) == UNKNOWN_MODEL  # nothing to check against: bounded
