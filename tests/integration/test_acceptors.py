"""`acceptors`: several gRPC servers in one process on one port (SO_REUSEPORT between
them), all serving the same engine; a port that another process holds is still refused."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.service.server import RnnserveServer, StartupError
from rnnserve.service.settings import Settings
from tests.integration._grpc_util import cached_reference, decode_tensor, pb, pb_grpc, tensor, xs
from tests.servers import ServerThread, unique


def sockets(port: int, state: str) -> int:
    """TCP sockets on this machine (IPv4 and IPv6) whose local port is `port` and whose
    state is `state` (/proc/net/tcp's hex code: 0A LISTEN, 06 TIME_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def listeners(port: int) -> int:
    return sockets(port, "0A")


def time_waits(port: int) -> int:
    return sockets(port, "06")


def test_every_acceptor_listens_and_one_session_spans_them(model_repo: Path) -> None:
    settings = Settings(model_repository=model_repo, host="127.0.0.1", port=0, acceptors=3)
    with ServerThread(settings) as server:
        assert listeners(server.port) == 3
        # Six connections: the kernel spreads them over the three servers. One session
        # stepped through all of them in turn is one state, in order.
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(6)
        ]
        try:
            stubs = [pb_grpc.RecurrentStub(channel) for channel in channels]
            session_id = unique("acceptors")
            stubs[0].StartSession(pb.StartSessionRequest(model="lstm", session_id=session_id))
            inputs = xs(1, 12, seed=7)
            outputs = []
            for t in range(12):
                reply = stubs[t % 6].Step(
                    pb.StepRequest(
                        model="lstm",
                        session_id=session_id,
                        seq=t,
                        inputs=[tensor("x", inputs[0, t])],
                    )
                )
                assert reply.seq == t + 1
                outputs.append(decode_tensor(reply.outputs[0]))
        finally:
            for channel in channels:
                channel.close()
        expected = cached_reference(model_repo, "lstm", inputs)[0]
        np.testing.assert_allclose(np.stack(outputs), expected, atol=1e-5)
        port = server.port
    assert listeners(port) == 0  # stop() closed every acceptor


def test_one_acceptor_is_one_listener(model_repo: Path) -> None:
    settings = Settings(model_repository=model_repo, host="127.0.0.1", port=0, acceptors=1)
    with ServerThread(settings) as server:
        assert listeners(server.port) == 1


@pytest.mark.parametrize("holder_reuses_port", [False, True])
async def test_a_port_another_socket_holds_is_refused(
    model_repo: Path, holder_reuses_port: bool
) -> None:
    # Held with SO_REUSEPORT (as another rnnserve's acceptors hold theirs), the kernel
    # would let our acceptors share it: the server checks first.
    with socket.socket() as holder:
        if holder_reuses_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = RnnserveServer(
            Settings(model_repository=model_repo, host="127.0.0.1", port=port, acceptors=2)
        )
        with pytest.raises(
            StartupError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"
        ):
            await server.start()
        assert listeners(port) == 1  # only the holder's


def test_a_port_whose_old_connections_linger_in_time_wait_is_free(model_repo: Path) -> None:
    # What a restarted server finds: the port's earlier connections, closed from the
    # server's side, wait in TIME_WAIT. They do not hold the port for gRPC (it binds
    # with SO_REUSEADDR), so they must not for the port check either.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: it goes to TIME_WAIT
            client.recv(1)
    assert time_waits(port) >= 1
    settings = Settings(model_repository=model_repo, host="127.0.0.1", port=port, acceptors=2)
    with ServerThread(settings) as server:
        assert server.port == port
        assert listeners(port) == 2
