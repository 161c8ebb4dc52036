"""`SessionRecord`: one session's state as one binary value (no pickle, no JSON).

A record is what the state store keeps under a session's key::

    offset  size  field
    0       4     magic b"RNSR"
    4       2     format version (1)
    6       2     flags (bit 0: floating states stored as float16)
    8       8     seq: steps applied since start          ┐ the compare-and-set token:
    16      8     incarnation: random, new on start/reset ┘ bytes [8, 24)
    24      8     created_at (unix seconds, float64)
    32      8     updated_at (unix seconds, float64)
    40      2     len(model name)      42  2  len(model version)
    44      2     len(last request id) 46  4  len(tensor layout)
    50      ...   model name, model version, last request id (UTF-8), tensor layout
    ...     ...   last outputs, constants, states: raw little-endian bytes, in that order

The tensor layout names every tensor's dtype and shape (one sample, no batch
axis) in three groups (outputs, constants, states), so a record decodes on its
own (`SessionRecord.decode`), e.g. for export. The serving path does not parse it
per session: `RecordCodec` compares the layout bytes with the ones it expects and
slices the tensor bytes straight out, so a batch of records becomes stacked
arrays with one `join` and one `frombuffer` per group.

Stores compare-and-set on bytes [8, 24): `seq` and `incarnation` together, so a
commit prepared before a session was restarted or reset cannot land on the new one.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from .errors import Internal, ModelVersionMismatch
from .store._base import Commit

__all__ = [
    "CAS_TOKEN_OFFSET",
    "CAS_TOKEN_SLICE",
    "FLAG_STATES_FLOAT16",
    "FORMAT_VERSION",
    "MAGIC",
    "RecordCodec",
    "RecordError",
    "RecordHeader",
    "RecordView",
    "SessionRecord",
    "cas_token",
    "new_incarnation",
    "read_header",
    "replace_record",
]

MAGIC = b"RNSR"
FORMAT_VERSION = 1
FLAG_STATES_FLOAT16 = 0x1
_HEADER = struct.Struct("<4sHHQQddHHHI")
CAS_TOKEN_OFFSET = 8  # seq + incarnation, the bytes a commit compares (`Commit.token_at`)
CAS_TOKEN_SLICE = slice(CAS_TOKEN_OFFSET, CAS_TOKEN_OFFSET + 16)
_SEQ_INCARNATION = struct.Struct("<QQ")
_TENSOR_HEAD = struct.Struct("<BB")
_COUNT = struct.Struct("<H")
_GROUPS = ("last_outputs", "constants", "states")


class RecordError(Internal):
    """Bytes under a session key are not a record this build can read."""


class _Spec(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...


def new_incarnation() -> int:
    return secrets.randbits(63)


def cas_token(seq: int, incarnation: int) -> bytes:
    """The bytes a store compares before it replaces a record (see module doc)."""
    return _SEQ_INCARNATION.pack(seq, incarnation)


def replace_record(key: str, read: RecordView, value: bytes, ttl_s: float) -> Commit:
    """The store's compare-and-set that replaces the record `read` was read from with
    `value`, if it is still that record (its seq + incarnation, at `CAS_TOKEN_OFFSET`)."""
    return Commit(key, cas_token(read.seq, read.incarnation), value, ttl_s, CAS_TOKEN_OFFSET)


def _le(dtype: Any) -> np.dtype[Any]:
    """The little-endian form of a dtype (single-byte types stay as they are)."""
    dt: np.dtype[Any] = np.dtype(dtype)
    if dt.byteorder in ("|", "<"):
        return dt
    return np.dtype(dt.newbyteorder("<"))


def _stored_dtype(dtype: np.dtype[Any], group: int, float16: bool) -> np.dtype[Any]:
    if float16 and group == 2 and dtype.kind == "f":
        return np.dtype("<f2")
    return _le(dtype)


def _layout_bytes(groups: Sequence[Sequence[tuple[tuple[int, ...], np.dtype[Any]]]]) -> bytes:
    parts: list[bytes] = []
    for group in groups:
        parts.append(_COUNT.pack(len(group)))
        for shape, dtype in group:
            name = _le(dtype).str.encode("ascii")
            parts.append(_TENSOR_HEAD.pack(len(name), len(shape)))
            parts.append(name)
            parts.append(struct.pack(f"<{len(shape)}I", *shape))
    return b"".join(parts)


def _parse_layout(raw: bytes | memoryview) -> list[list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    groups: list[list[tuple[tuple[int, ...], np.dtype[Any]]]] = []
    pos = 0
    for _ in _GROUPS:
        (count,) = _COUNT.unpack_from(raw, pos)
        pos += _COUNT.size
        group = []
        for _ in range(count):
            name_len, ndim = _TENSOR_HEAD.unpack_from(raw, pos)
            pos += _TENSOR_HEAD.size
            dtype = np.dtype(bytes(raw[pos : pos + name_len]).decode("ascii"))
            pos += name_len
            shape = struct.unpack_from(f"<{ndim}I", raw, pos)
            pos += 4 * ndim
            group.append((tuple(shape), dtype))
        groups.append(group)
    if pos != len(raw):
        raise RecordError(f"tensor layout has {len(raw) - pos} trailing byte(s)")
    return groups


_F16 = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)


def _as_sample(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """`array` in its stored dtype; float16 storage saturates at +-65504 (never inf)."""
    if dtype == _F16 and array.dtype != _F16:
        array = np.clip(array, -_F16_MAX, _F16_MAX)
    return np.ascontiguousarray(array, dtype=dtype)


@dataclass(frozen=True, kw_only=True, eq=False)
class SessionRecord:
    """One session, decoded: header fields plus its tensors (one sample each, no batch axis).

    `states_float16` stores floating states as float16 (half the bytes, ~3 significant
    digits, saturating at +-65504); decoding gives them back in their own dtype.
    """

    model: str
    version: str
    seq: int = 0
    incarnation: int = field(default_factory=new_incarnation)
    created_at: float = 0.0
    updated_at: float = 0.0
    last_request_id: str = ""
    last_outputs: tuple[np.ndarray, ...] = ()
    constants: tuple[np.ndarray, ...] = ()
    states: tuple[np.ndarray, ...] = ()
    states_float16: bool = False

    @property
    def cas_token(self) -> bytes:
        return cas_token(self.seq, self.incarnation)

    def encode(self) -> bytes:
        groups = (self.last_outputs, self.constants, self.states)
        layout = _layout_bytes([[(tuple(a.shape), a.dtype) for a in group] for group in groups])
        data = [
            _as_sample(a, _stored_dtype(a.dtype, g, self.states_float16)).tobytes()
            for g, group in enumerate(groups)
            for a in group
        ]
        return _encode(
            flags=FLAG_STATES_FLOAT16 if self.states_float16 else 0,
            seq=self.seq,
            incarnation=self.incarnation,
            created_at=self.created_at,
            updated_at=self.updated_at,
            model=self.model.encode(),
            version=self.version.encode(),
            request_id=self.last_request_id.encode(),
            layout=layout,
            data=data,
        )

    @classmethod
    def decode(cls, raw: bytes) -> SessionRecord:
        head = read_header(raw)
        float16 = bool(head.flags & FLAG_STATES_FLOAT16)
        groups = _parse_layout(head.layout)
        pos = head.data_offset
        decoded: list[tuple[np.ndarray, ...]] = []
        for g, group in enumerate(groups):
            arrays = []
            for shape, dtype in group:
                stored = _stored_dtype(dtype, g, float16)
                nbytes = math.prod(shape) * stored.itemsize
                if pos + nbytes > len(raw):
                    raise RecordError("record is shorter than its tensor layout says")
                array = np.frombuffer(raw, dtype=stored, count=math.prod(shape), offset=pos)
                arrays.append(array.reshape(shape).astype(dtype.newbyteorder("=")))
                pos += nbytes
            decoded.append(tuple(arrays))
        if pos != len(raw):
            raise RecordError(f"record has {len(raw) - pos} trailing byte(s)")
        return cls(
            model=head.model,
            version=head.version,
            seq=head.seq,
            incarnation=head.incarnation,
            created_at=head.created_at,
            updated_at=head.updated_at,
            last_request_id=head.request_id,
            last_outputs=decoded[0],
            constants=decoded[1],
            states=decoded[2],
            states_float16=float16,
        )


class RecordHeader(NamedTuple):
    """A record's header fields, without its tensors (`read_header`)."""

    flags: int
    seq: int
    incarnation: int
    created_at: float
    updated_at: float
    model: str
    version: str
    request_id: str
    layout: bytes
    data_offset: int


def _encode(
    *,
    flags: int,
    seq: int,
    incarnation: int,
    created_at: float,
    updated_at: float,
    model: bytes,
    version: bytes,
    request_id: bytes,
    layout: bytes,
    data: Sequence[bytes | memoryview],
) -> bytes:
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        flags,
        seq,
        incarnation,
        created_at,
        updated_at,
        len(model),
        len(version),
        len(request_id),
        len(layout),
    )
    return b"".join((header, model, version, request_id, layout, *data))


def read_header(raw: bytes) -> RecordHeader:
    """The header of a record of any model version (raises `RecordError`)."""
    if len(raw) < _HEADER.size:
        raise RecordError(f"record of {len(raw)} byte(s) is shorter than its header")
    magic, fmt, flags, seq, inc, created, updated, ml, vl, rl, ll = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise RecordError(f"not a session record (magic {magic!r})")
    if fmt != FORMAT_VERSION:
        raise RecordError(f"session record format {fmt} is not supported (this build: 1)")
    pos = _HEADER.size
    end = pos + ml + vl + rl + ll
    if end > len(raw):
        raise RecordError("record is shorter than its header says")
    model = raw[pos : pos + ml].decode()
    version = raw[pos + ml : pos + ml + vl].decode()
    request_id = raw[pos + ml + vl : pos + ml + vl + rl].decode()
    layout = raw[end - ll : end]
    return RecordHeader(flags, seq, inc, created, updated, model, version, request_id, layout, end)


class RecordView(NamedTuple):
    """A record checked against a `RecordCodec`, with its tensor bytes sliced out (no copies)."""

    seq: int
    incarnation: int
    created_at: float
    updated_at: float
    last_request_id: str
    outputs: memoryview
    constants: memoryview
    states: memoryview


class RecordCodec:
    """Records of one model version, encoded and decoded a batch at a time.

    Built from the step signature's outputs, constants and states. `view()` checks a
    record's magic, format, model, version and tensor layout with a few slice compares
    and returns its tensor bytes; the stacking helpers turn a batch of those into
    batch-first arrays (and back into per-session bytes) with a handful of numpy calls.
    """

    def __init__(
        self,
        *,
        model: str,
        version: str,
        outputs: Sequence[_Spec],
        constants: Sequence[_Spec],
        states: Sequence[_Spec],
        states_float16: bool = False,
    ) -> None:
        self.model = model
        self.version = version
        self.states_float16 = states_float16
        self._flags = FLAG_STATES_FLOAT16 if states_float16 else 0
        self._model_b = model.encode()
        self._version_b = version.encode()
        self._names = self._model_b + self._version_b
        groups = [
            [(tuple(s.shape), _le(s.dtype)) for s in specs]
            for specs in (outputs, constants, states)
        ]
        self._groups = groups
        self._layout = _layout_bytes(groups)
        # (logical dtype, stored dtype, shape, byte offset in the group's row) per tensor
        self._fields: list[
            list[tuple[np.dtype[Any], np.dtype[Any], tuple[int, ...], int, int]]
        ] = []
        self._group_nbytes: list[int] = []
        for g, group in enumerate(groups):
            offset = 0
            fields = []
            for shape, dtype in group:
                stored = _stored_dtype(dtype, g, states_float16)
                nbytes = math.prod(shape) * stored.itemsize
                fields.append((dtype.newbyteorder("="), stored, shape, offset, nbytes))
                offset += nbytes
            self._fields.append(fields)
            self._group_nbytes.append(offset)
        self.outputs_nbytes, self.constants_nbytes, self.states_nbytes = self._group_nbytes
        self._prefix_len = _HEADER.size + len(self._names)
        self.record_nbytes_without_request_id = (
            self._prefix_len + len(self._layout) + sum(self._group_nbytes)
        )

    # -- one record -------------------------------------------------------------
    def encode(
        self,
        *,
        seq: int,
        incarnation: int,
        created_at: float,
        updated_at: float,
        request_id: bytes,
        outputs: bytes | memoryview,
        constants: bytes | memoryview,
        states: bytes | memoryview,
    ) -> bytes:
        return b"".join(
            (
                _HEADER.pack(
                    MAGIC,
                    FORMAT_VERSION,
                    self._flags,
                    seq,
                    incarnation,
                    created_at,
                    updated_at,
                    len(self._model_b),
                    len(self._version_b),
                    len(request_id),
                    len(self._layout),
                ),
                self._names,
                request_id,
                self._layout,
                outputs,
                constants,
                states,
            )
        )

    def view(self, raw: bytes) -> RecordView:
        """The record's fields, if it belongs to this model version and layout.

        Raises `ModelVersionMismatch` for a record of another version (or model) and
        `RecordError` for bytes that are not a record. A record of this version whose
        layout differs (e.g. stored with another `states_float16` setting) is
        re-encoded through `SessionRecord` first.
        """
        try:
            magic, fmt, flags, seq, inc, created, updated, ml, vl, rl, ll = _HEADER.unpack_from(raw)
        except struct.error as exc:
            raise RecordError(f"record of {len(raw)} byte(s) is shorter than its header") from exc
        if magic != MAGIC or fmt != FORMAT_VERSION:
            read_header(raw)  # raises the precise RecordError
        pos = _HEADER.size
        names_end = pos + ml + vl
        if raw[pos:names_end] != self._names or ml != len(self._model_b):
            head = read_header(raw)
            raise ModelVersionMismatch(
                f"session belongs to model {head.model!r} version {head.version!r}, "
                f"not {self.model!r} version {self.version!r}; start a new session "
                "(or export it and import it into this version)"
            )
        layout_at = names_end + rl
        data_at = layout_at + ll
        if (
            flags != self._flags
            or raw[layout_at:data_at] != self._layout
            or len(raw) != data_at + sum(self._group_nbytes)
        ):
            return self.view(self.reencode(SessionRecord.decode(raw)))
        mv = memoryview(raw)
        out_end = data_at + self.outputs_nbytes
        const_end = out_end + self.constants_nbytes
        return RecordView(
            seq,
            inc,
            created,
            updated,
            raw[names_end:layout_at].decode(),
            mv[data_at:out_end],
            mv[out_end:const_end],
            mv[const_end:],
        )

    def reencode(self, record: SessionRecord) -> bytes:
        """A record of this model version in this codec's layout (or `ModelVersionMismatch`)."""
        if record.model != self.model or record.version != self.version:
            raise ModelVersionMismatch(
                f"session belongs to model {record.model!r} version {record.version!r}, "
                f"not {self.model!r} version {self.version!r}"
            )
        groups = (record.last_outputs, record.constants, record.states)
        rows = []
        for g, (arrays, fields) in enumerate(zip(groups, self._fields, strict=True)):
            self._check_group(g, arrays)
            rows.append(
                b"".join(
                    _as_sample(a, stored).tobytes()
                    for a, (_, stored, _, _, _) in zip(arrays, fields, strict=True)
                )
            )
        return self.encode(
            seq=record.seq,
            incarnation=record.incarnation,
            created_at=record.created_at,
            updated_at=record.updated_at,
            request_id=record.last_request_id.encode(),
            outputs=rows[0],
            constants=rows[1],
            states=rows[2],
        )

    def _check_group(self, g: int, arrays: Sequence[np.ndarray]) -> None:
        expected = self._groups[g]
        if len(arrays) != len(expected):
            raise RecordError(
                f"record has {len(arrays)} {_GROUPS[g]} tensor(s), the model has {len(expected)}"
            )
        for i, (array, (shape, _)) in enumerate(zip(arrays, expected, strict=True)):
            if tuple(array.shape) != shape:
                raise RecordError(
                    f"{_GROUPS[g]}[{i}] has shape {tuple(array.shape)}, the model's is {shape}"
                )

    # -- batches ------------------------------------------------------------------
    def _stack(self, g: int, rows: Sequence[bytes | memoryview]) -> list[np.ndarray]:
        fields = self._fields[g]
        if not fields:
            return []
        n = len(rows)
        matrix = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(n, self._group_nbytes[g])
        arrays = []
        for logical, stored, shape, offset, nbytes in fields:
            block = np.ascontiguousarray(matrix[:, offset : offset + nbytes])
            arrays.append(block.view(stored).reshape(n, *shape).astype(logical, copy=False))
        return arrays

    def stack_constants(self, views: Sequence[RecordView]) -> list[np.ndarray]:
        return self._stack(1, [v.constants for v in views])

    def stack_states(self, views: Sequence[RecordView]) -> list[np.ndarray]:
        return self._stack(2, [v.states for v in views])

    def stack_outputs(self, views: Sequence[RecordView]) -> list[np.ndarray]:
        """The stored last outputs of `views`, batch-first (replies of retried steps)."""
        return self._stack(0, [v.outputs for v in views])

    def _rows(self, g: int, arrays: Sequence[np.ndarray], n: int) -> list[bytes]:
        fields = self._fields[g]
        if not fields:
            return [b""] * n
        parts = [
            _as_sample(a, stored).reshape(n, -1).view(np.uint8)
            for a, (_, stored, _, _, _) in zip(arrays, fields, strict=True)
        ]
        matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return [row.tobytes() for row in matrix]

    def output_rows(self, outputs: Sequence[np.ndarray], n: int) -> list[bytes]:
        """Batch-first outputs -> one byte row per session."""
        return self._rows(0, outputs, n)

    def constant_rows(self, constants: Sequence[np.ndarray], n: int) -> list[bytes]:
        return self._rows(1, constants, n)

    def state_rows(self, states: Sequence[np.ndarray], n: int) -> list[bytes]:
        """Batch-first states -> one byte row per session (float16 if configured)."""
        return self._rows(2, states, n)
