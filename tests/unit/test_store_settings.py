"""The Redis store settings (Sentinel, the replica-ack rule) and the rolled-back error:
bad combinations are refused before anything starts, the lost-commit message names
the gap, and the SDK reads it back as `SessionRolledBack`."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from rnnserve.client import SeqConflict, SessionRolledBack
from rnnserve.client._exceptions import from_status
from rnnserve.service import errors
from rnnserve.service.server import describe_store
from rnnserve.service.settings import Settings
from rnnserve.service.store import parse_sentinels


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"redis_sentinel": "127.0.0.1:26379"}, "redis_sentinel and redis_service go together"),
        ({"redis_service": "main"}, "redis_sentinel and redis_service go together"),
        (
            {"redis_sentinel": "a:1", "redis_service": "m", "redis_url": "redis://x"},
            "not both",
        ),
        (
            {"redis_sentinel": "a:1", "redis_service": "m", "redis_cluster": True},
            "redis_cluster takes redis_url",
        ),
        ({"redis_sentinel": "a:1,b", "redis_service": "m"}, "'b' is not host:port"),
        ({"redis_sentinel": "a:0", "redis_service": "m"}, "'a:0' is not host:port"),
        ({"redis_min_replicas_ack": 1}, "the memory store has no replicas"),
        (
            {"redis_url": "redis://x", "redis_replicas_ack_timeout_ms": 2000},
            "must be below redis_timeout_s",
        ),
        ({"redis_url": "redis://x", "redis_replicas_ack_timeout_ms": 0}, "greater than"),
        ({"redis_url": "redis://x", "redis_min_replicas_ack": -1}, "greater than"),
    ],
)
def test_bad_store_settings_are_refused(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(**options)


def test_good_store_settings_and_their_description() -> None:
    assert "memory" in describe_store(Settings())
    sentinel = Settings(
        redis_sentinel="10.0.0.1:26379, 10.0.0.2:26379", redis_service="main",
        redis_min_replicas_ack=1, redis_replicas_ack_timeout_ms=100,
    )  # fmt: skip
    text = describe_store(sentinel)
    assert "Sentinel 10.0.0.1:26379" in text and "service main" in text, text
    assert "waits for 1 replica(s) (up to 100 ms)" in text
    plain = describe_store(Settings(redis_url="redis://user:secret@host:6379/0"))
    assert "secret" not in plain and "redis://user:***@host:6379/0" in plain
    assert "not waited for" in plain
    assert parse_sentinels("h1:1, h2:26379") == [("h1", 1), ("h2", 26379)]


def test_the_rolled_back_error_names_the_gap() -> None:
    exc = errors.SessionRolledBack("s", stored_seq=2, requested_seq=5)
    assert isinstance(exc, errors.SeqConflict) and exc.code == "FAILED_PRECONDITION"
    assert (exc.stored_seq, exc.requested_seq, exc.missing, exc.current_seq) == (2, 5, 3, 2)
    assert exc.message.startswith(
        "session 's' is at seq 2 but this step expected seq 5: steps 3 to 5 are missing "
        "from the state store"
    )
    one = errors.SessionRolledBack("s", stored_seq=4, requested_seq=5)
    assert "step 5 is missing" in one.message


def test_the_sdk_reads_the_rolled_back_status() -> None:
    """Through the status's `ErrorDetail` (grpc_status.py), as the server sends it: the
    SDK reads the reason and the seqs, never the message."""
    from rnnserve.service.grpc_status import error_detail

    exc = errors.SessionRolledBack("s", stored_seq=2, requested_seq=5)
    client_error = from_status(grpc.StatusCode.FAILED_PRECONDITION, exc.message, error_detail(exc))
    assert isinstance(client_error, SessionRolledBack)
    assert not isinstance(client_error, SeqConflict)  # never resynchronised silently
    assert (client_error.stored_seq, client_error.requested_seq, client_error.missing) == (2, 5, 3)
    stale = errors.SeqConflict("session 's' is at seq 4; x", current_seq=4, requested_seq=1)
    conflict = from_status(grpc.StatusCode.FAILED_PRECONDITION, stale.message, error_detail(stale))
    assert isinstance(conflict, SeqConflict) and conflict.current_seq == 4
