"""The domain error hierarchy: codes, and no transport import."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rnnserve.service import errors

CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
}


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_has_a_known_code(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.RnnserveError)
    if cls is not errors.RnnserveError:
        assert cls.code in CODES
        assert cls.__name__ in (errors.__doc__ or "")  # drawn in the tree


@pytest.mark.parametrize(
    ("cls", "parent", "code"),
    [
        pytest.param(errors.SessionNotFound, errors.NotFound, "NOT_FOUND", id="session"),
        pytest.param(errors.ModelNotFound, errors.NotFound, "NOT_FOUND", id="model"),
        pytest.param(
            errors.ModelVersionMismatch,
            errors.FailedPrecondition,
            "FAILED_PRECONDITION",
            id="version",
        ),
        pytest.param(errors.QueueFull, errors.ResourceExhausted, "RESOURCE_EXHAUSTED", id="queue"),
        pytest.param(errors.StoreUnavailable, errors.Unavailable, "UNAVAILABLE", id="store"),
        pytest.param(errors.ConcurrentUpdate, errors.Aborted, "ABORTED", id="cas"),
    ],
)
def test_tree(cls: type[errors.RnnserveError], parent: type, code: str) -> None:
    assert issubclass(cls, parent)
    assert cls("x").code == code


def test_seq_conflict_carries_the_current_seq() -> None:
    exc = errors.SeqConflict("session 'a' is at seq 4", current_seq=4)
    assert exc.current_seq == 4
    assert exc.code == "FAILED_PRECONDITION"
    assert str(exc) == exc.message == "session 'a' is at seq 4"


def test_importing_errors_imports_no_transport() -> None:
    code = (
        "import sys; import rnnserve.service.errors; "
        "bad = [m for m in ('grpc', 'redis', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_has_a_reason_drawn_in_the_tree(name: str) -> None:
    """The reason is the wire's `ErrorDetail.reason`: UPPER_SNAKE_CASE, the code's own
    name or the parent's unless the class names a more specific one, and shown in the
    module's tree."""
    cls = getattr(errors, name)
    if cls is errors.RnnserveError:
        return
    assert re.fullmatch(r"[A-Z][A-Z_]*", cls.reason), cls.reason
    if "reason" not in cls.__dict__:  # its parent's (for a code's own class: the code)
        assert cls.reason == (cls.code if "code" in cls.__dict__ else cls.__mro__[1].reason)
    assert cls.reason in (errors.__doc__ or "")


def test_seq_conflict_carries_the_requested_seq() -> None:
    exc = errors.SeqConflict("session 'a' is at seq 4", current_seq=4, requested_seq=2)
    assert (exc.reason, exc.current_seq, exc.requested_seq) == ("SEQ_CONFLICT", 4, 2)
    assert errors.ModelVersionMismatch("x").reason == "VERSION_MISMATCH"
    assert errors.ModelVersionMismatch("x").current_seq is None
