"""SessionRecord / RecordCodec: the binary session record (property tests)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rnnserve.core import TensorSpec
from rnnserve.service.errors import ModelVersionMismatch
from rnnserve.service.record import (
    CAS_TOKEN_SLICE,
    RecordCodec,
    RecordError,
    SessionRecord,
    cas_token,
    read_header,
)

DTYPES = ["float32", "float64", "float16", "int32", "int64", "uint8", "bool"]

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(
        dt,
        shapes,
        elements=None if dt != "float16" else st.floats(-100, 100, width=16),
    )
)
texts = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def records(draw: st.DrawFn, float16: bool | None = None) -> SessionRecord:
    return SessionRecord(
        model=draw(texts),
        version=draw(texts),
        seq=draw(st.integers(0, 2**64 - 1)),
        incarnation=draw(st.integers(0, 2**64 - 1)),
        created_at=draw(finite),
        updated_at=draw(finite),
        last_request_id=draw(texts),
        last_outputs=tuple(draw(st.lists(arrays, max_size=3))),
        constants=tuple(draw(st.lists(arrays, max_size=2))),
        states=tuple(draw(st.lists(arrays, max_size=3))),
        states_float16=draw(st.booleans()) if float16 is None else float16,
    )


def assert_same_arrays(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@given(records(float16=False))
def test_round_trip_is_exact(record: SessionRecord) -> None:
    raw = record.encode()
    back = SessionRecord.decode(raw)
    for name in (
        "model",
        "version",
        "seq",
        "incarnation",
        "created_at",
        "updated_at",
        "last_request_id",
    ):
        assert getattr(back, name) == getattr(record, name)
    assert_same_arrays(back.last_outputs, record.last_outputs)
    assert_same_arrays(back.constants, record.constants)
    assert_same_arrays(back.states, record.states)
    assert raw[CAS_TOKEN_SLICE] == cas_token(record.seq, record.incarnation) == back.cas_token
    assert SessionRecord.decode(back.encode()) is not None
    assert back.encode() == raw


@given(records(float16=True))
def test_float16_states_round_trip_through_half_precision(record: SessionRecord) -> None:
    back = SessionRecord.decode(record.encode())
    assert back.states_float16
    want = tuple(
        np.clip(s, -65504, 65504).astype(np.float16).astype(s.dtype) if s.dtype.kind == "f" else s
        for s in record.states
    )
    assert_same_arrays(back.states, want)
    assert_same_arrays(back.constants, record.constants)  # only states are narrowed


def test_float16_halves_float32_state_bytes() -> None:
    states = (np.ones(256, "float32"), np.ones(256, "float32"))
    full = SessionRecord(model="m", version="1", states=states).encode()
    half = SessionRecord(model="m", version="1", states=states, states_float16=True).encode()
    assert len(full) - len(half) == 1024


def test_tensor_bytes_are_little_endian() -> None:
    raw = SessionRecord(model="m", version="1", states=(np.array([1.0], ">f4"),)).encode()
    assert raw.endswith(struct.pack("<f", 1.0))
    assert SessionRecord.decode(raw).states[0].dtype == np.dtype("float32")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"", "shorter than its header", id="empty"),
        pytest.param(b"JUNK" + bytes(60), "not a session record", id="magic"),
        pytest.param(b"RNSR\x09\x00" + bytes(60), "format 9", id="format"),
    ],
)
def test_garbage_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        SessionRecord.decode(raw)


def test_truncated_and_padded_records_are_refused() -> None:
    raw = SessionRecord(model="m", version="1", states=(np.ones(4, "float32"),)).encode()
    with pytest.raises(RecordError, match="shorter"):
        SessionRecord.decode(raw[:-1])
    with pytest.raises(RecordError, match="trailing"):
        SessionRecord.decode(raw + b"\x00")


OUT = [TensorSpec("y", (4,), "float32")]
CONST = [TensorSpec("c", (2, 3), "int32")]
STATES = [TensorSpec("h", (5,), "float32"), TensorSpec("c", (5,), "float32")]


def codec(float16: bool = False, version: str = "1") -> RecordCodec:
    return RecordCodec(
        model="m",
        version=version,
        outputs=OUT,
        constants=CONST,
        states=STATES,
        states_float16=float16,
    )


@st.composite
def batches(draw: st.DrawFn) -> list[SessionRecord]:
    n = draw(st.integers(1, 6))
    floats = st.floats(-1e3, 1e3, width=32)
    out = []
    for _ in range(n):
        out.append(
            SessionRecord(
                model="m",
                version="1",
                seq=draw(st.integers(0, 10**9)),
                last_request_id=draw(texts),
                last_outputs=(draw(hnp.arrays("float32", (4,), elements=floats)),),
                constants=(draw(hnp.arrays("int32", (2, 3))),),
                states=tuple(draw(hnp.arrays("float32", (5,), elements=floats)) for _ in range(2)),
                states_float16=draw(st.booleans()),
            )
        )
    return out


@settings(max_examples=50)
@given(batches(), st.booleans())
def test_codec_batch_path_agrees_with_decode(batch: list[SessionRecord], float16: bool) -> None:
    c = codec(float16)
    raws = [r.encode() for r in batch]
    views = [c.view(raw) for raw in raws]
    assert [v.seq for v in views] == [r.seq for r in batch]
    assert [v.last_request_id for v in views] == [r.last_request_id for r in batch]
    decoded = [SessionRecord.decode(raw) for raw in raws]
    states = c.stack_states(views)
    for j in range(2):
        want = np.stack([d.states[j] for d in decoded])
        if float16:
            want = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(states[j], want)
    np.testing.assert_array_equal(
        c.stack_constants(views)[0], np.stack([d.constants[0] for d in decoded])
    )
    # and back: rows re-encoded by the codec decode to the same tensors
    rows = c.state_rows(states, len(batch))
    outs = c.output_rows([np.stack([d.last_outputs[0] for d in decoded])], len(batch))
    for k, (view, row, out_row) in enumerate(zip(views, rows, outs, strict=True)):
        raw = c.encode(
            seq=view.seq + 1,
            incarnation=view.incarnation,
            created_at=view.created_at,
            updated_at=1.0,
            request_id=b"r",
            outputs=out_row,
            constants=view.constants,
            states=row,
        )
        again = SessionRecord.decode(raw)
        assert (again.seq, again.last_request_id, again.states_float16) == (
            view.seq + 1,
            "r",
            float16,
        )
        np.testing.assert_array_equal(again.states[0], states[0][k])
        np.testing.assert_array_equal(c.stack_outputs([view])[0][0], decoded[k].last_outputs[0])


def test_codec_refuses_other_versions_and_shapes() -> None:
    raw = codec().reencode(
        SessionRecord(
            model="m",
            version="1",
            last_outputs=(np.zeros(4, "float32"),),
            constants=(np.zeros((2, 3), "int32"),),
            states=(np.zeros(5, "float32"), np.zeros(5, "float32")),
        )
    )
    assert read_header(raw).version == "1"
    with pytest.raises(ModelVersionMismatch, match="version '1', not 'm' version '2'"):
        codec(version="2").view(raw)
    wrong = SessionRecord(model="m", version="1", states=(np.zeros(3, "float32"),))
    with pytest.raises(RecordError, match="tensor"):
        codec().view(wrong.encode())
