"""TLS and mTLS: certificates made here with the `openssl` CLI, a real server on port 0."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration._grpc_util import native_stub, pb, rpc_error, running_server
from tests.servers import ServerThread

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(folder: Path, name: str, extensions: str) -> None:
    """`name.key` and `name.pem`, signed by the CA in `folder`."""
    _openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=rnnserve-test-{name}", cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl CLI")
    folder = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=rnnserve-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    _issue(
        folder,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _issue(folder, "client", "extendedKeyUsage=clientAuth\n")
    return folder


@pytest.fixture(scope="module")
def lstm_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lstm-only")
    shutil.copytree(model_repo / "lstm", root / "lstm")
    return root


def credentials(certs: Path, *, client_cert: bool) -> grpc.ChannelCredentials:
    root = (certs / "ca.pem").read_bytes()
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=(certs / "client.key").read_bytes(),
        certificate_chain=(certs / "client.pem").read_bytes(),
    )


def list_models(address: str, creds: grpc.ChannelCredentials | None) -> pb.ListModelsResponse:
    channel, stub = native_stub(address, creds)
    with channel:
        return stub.ListModels(pb.ListModelsRequest(), timeout=30)


def list_models_error(address: str, creds: grpc.ChannelCredentials | None) -> grpc.RpcError:
    channel, stub = native_stub(address, creds)
    with channel:
        return rpc_error(stub.ListModels, pb.ListModelsRequest(), timeout=30)


@pytest.fixture(scope="module")
def tls_server(certs: Path, lstm_repo: Path) -> Iterator[ServerThread]:
    with running_server(
        lstm_repo,
        warmup=False,
        tls_cert_file=certs / "server.pem",
        tls_key_file=certs / "server.key",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(certs: Path, lstm_repo: Path) -> Iterator[ServerThread]:
    with running_server(
        lstm_repo,
        warmup=False,
        tls_cert_file=certs / "server.pem",
        tls_key_file=certs / "server.key",
        tls_client_ca_file=certs / "ca.pem",
    ) as running:
        yield running


def test_tls_serves_a_client_that_trusts_the_ca(tls_server: ServerThread, certs: Path) -> None:
    reply = list_models(tls_server.address, credentials(certs, client_cert=False))
    assert [m.name for m in reply.models] == ["lstm"]


def test_tls_refuses_plaintext(tls_server: ServerThread) -> None:
    error = list_models_error(tls_server.address, None)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_refused_by_a_client_that_does_not_trust_the_server(
    tls_server: ServerThread,
) -> None:
    error = list_models_error(tls_server.address, grpc.ssl_channel_credentials())
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_with_a_certificate(mtls_server: ServerThread, certs: Path) -> None:
    reply = list_models(mtls_server.address, credentials(certs, client_cert=True))
    assert [m.name for m in reply.models] == ["lstm"]


def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: ServerThread, certs: Path
) -> None:
    error = list_models_error(mtls_server.address, credentials(certs, client_cert=False))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_plaintext(mtls_server: ServerThread) -> None:
    error = list_models_error(mtls_server.address, None)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
