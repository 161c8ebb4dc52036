"""Auth across namespaces, the RPCs the gRPC error tests do not cover: a token of
namespace B cannot run a sequence on, stream steps to, overwrite by import, or reach
through KServe a session of namespace A. B gets NOT_FOUND / INVALID_ARGUMENT and no
data; A's session is unchanged throughout. (No token -> UNAUTHENTICATED, Get/Step/
Export/Reset/End across namespaces and TLS/mTLS are in tests/integration.)"""

from __future__ import annotations

import grpc
import numpy as np

from rnnserve.protocol.inference import grpc_service_pb2 as kpb
from rnnserve.protocol.inference import grpc_service_pb2_grpc as kgrpc
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2 as pb
from rnnserve.protocol.rnnserve.v1 import recurrent_pb2_grpc as pb_grpc
from rnnserve.service.settings import Settings
from rnnserve.service.wire import encode_tensor
from tests.models import FEATURES
from tests.servers import ServerThread

A = [("authorization", "Bearer token-a")]
B = [("authorization", "Bearer token-b")]


def _error(call, request, metadata) -> grpc.RpcError:
    try:
        result = call(request, metadata=metadata, timeout=30)
        if isinstance(result, grpc.Call):
            list(result)  # type: ignore[call-overload]
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("expected an error")


def test_namespace_b_cannot_reach_a_session_of_a(model_repo):
    settings = Settings(
        model_repository=model_repo, port=0, host="127.0.0.1", warmup=False,
        auth_tokens="token-a=alpha,token-b=beta",
    )  # fmt: skip
    x = encode_tensor("x", np.ones(FEATURES, "float32"))
    xs = encode_tensor("x", np.ones((2, FEATURES), "float32"))
    with ServerThread(settings) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecurrentStub(channel)
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        ref = pb.SessionRef(model="lstm", session_id="secret")
        stub.StartSession(pb.StartSessionRequest(model="lstm", session_id="secret"), metadata=A)
        stub.Step(pb.StepRequest(model="lstm", session_id="secret", inputs=[x]), metadata=A)
        before = stub.ExportState(ref, metadata=A).record

        run = pb.RunSequenceRequest(model="lstm", session_id="secret", inputs=[xs])
        for call in (stub.RunSequence, stub.RunSequenceStream):
            error = _error(call, run, B)
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
        replies = list(
            stub.StepStream(
                iter([pb.StepRequest(model="lstm", session_id="secret", inputs=[x])]), metadata=B
            )
        )
        assert replies[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert not replies[0].outputs

        infer = kpb.ModelInferRequest(model_name="lstm")
        infer.parameters["sequence_id"].string_param = "secret"
        infer.inputs.add(name="x", datatype="FP32", shape=[1, FEATURES]).contents.fp32_contents[
            :
        ] = [1.0] * FEATURES
        error = _error(kserve.ModelInfer, infer, B)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # as Triton: no START

        # B imports A's exported record under the same id: it lands in B's namespace only.
        stub.ImportState(pb.ImportStateRequest(session=ref, record=before), metadata=B)
        stub.Step(pb.StepRequest(model="lstm", session_id="secret", inputs=[x]), metadata=B)
        assert stub.GetSession(ref, metadata=B).seq == 2
        assert stub.EndSession(ref, metadata=B).existed

        after = stub.ExportState(ref, metadata=A)
        assert after.record == before and after.session.seq == 1
