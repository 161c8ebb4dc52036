"""`rnnserve.client.convert`: lossless casts only, for the SDK and the CLI alike."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.client import InvalidRequest, convert
from rnnserve.client._models import TensorSpec, encode_named


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (3, "int32", np.int32(3)),
        ([1, 2, 3], "int8", np.array([1, 2, 3], "int8")),
        (np.array([1, 2], "int64"), "uint16", np.array([1, 2], "uint16")),
        (True, "float32", np.float32(1)),
        ([True, False], "int32", np.array([1, 0], "int32")),
        (16_777_216, "float32", np.float32(16_777_216)),  # 2**24 is exact in float32
        ([0.5, -1.25], "float32", np.array([0.5, -1.25], "float32")),
        (0.1, "float32", np.float32(0.1)),  # float to float rounds, as floats do
        (np.float32(2.5), "float64", np.float64(2.5)),
        (np.array([1.0, np.nan]), "float32", np.array([1.0, np.nan], "float32")),
        ([[1, 2], [3, 4]], "int32", np.array([[1, 2], [3, 4]], "int32")),
        (np.zeros((0, 2), "int64"), "int32", np.zeros((0, 2), "int32")),
    ],
)
def test_lossless_casts_are_made(value, dtype, expected) -> None:
    got = convert(value, dtype, name="x")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (
            3.5,
            "int32",
            r"input 'x': expected int32 \(integers\), got float64 values \(e\.g\. 3\.5\)",
        ),
        (3.0, "int32", r"got float64 values \(e\.g\. 3\.0\)"),
        (np.array([1, 2], "float32"), "int32", r"got float32 values"),
        (float("nan"), "int64", r"\(e\.g\. nan\)"),
        (300, "int8", r"300 does not fit int8 \(-128 to 127\)"),
        (-1, "uint8", r"-1 does not fit uint8"),
        (16_777_217, "float32", r"16777217 is not exactly a float32"),
        (1e300, "float32", r"out of the range of float32"),
        ("a", "int32", r"expected int32 values, got str32 \(e\.g\. 'a'\)"),
        ([1, "a"], "float32", r"expected float32 values"),
        (2, "bool", r"expected bool values, got int64 \(e\.g\. 2\)"),
        ([[1, 2], [3]], "float32", r"not an array of float32"),
    ],
)
def test_anything_that_would_change_a_value_is_refused(value, dtype, message) -> None:
    with pytest.raises(InvalidRequest, match=message) as refused:
        convert(value, dtype, name="x")
    assert refused.value.code is None  # the client's own refusal: nothing was sent
    assert refused.value.reason == "CLIENT"


def test_the_sdk_encodes_through_convert() -> None:
    specs = [TensorSpec("chars", "int32", ())]
    (tensor,) = encode_named(specs, 3, role="input")
    assert (tensor.dtype, tensor.data) == ("int32", np.int32(3).tobytes())
    with pytest.raises(InvalidRequest, match="input 'chars'"):
        encode_named(specs, 3.5, role="input")
    with pytest.raises(InvalidRequest, match="constant 'c'"):
        encode_named([TensorSpec("c", "float32", (2,))], {"c": ["a", "b"]}, role="constant")
