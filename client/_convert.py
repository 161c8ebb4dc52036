"""`convert`: a value as an array of a signature's dtype, by lossless casts only.

The SDK (and so `rnnserve client`) takes numbers, lists and arrays of any dtype; the
server takes exactly the signature's dtype. Converting must never change a value
silently, so only these casts are made:

- the same dtype, or `bool` to any number: as is;
- an integer to an integer: when every value fits the target's range;
- an integer to a float: when every value is exactly representable (|v| <= 2**24 for
  float32, for example);
- a float to a float: rounding to the nearest value is what floats do, but a finite
  value must stay finite (no overflow to infinity);

and everything else is refused with `InvalidRequest` naming the tensor: a float (3.5,
or 3.0, or NaN) for an integer input, a number for a bool, strings, nested lists of
ragged lengths.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rnnserve.client._exceptions import InvalidRequest

__all__ = ["convert"]


def _example(array: np.ndarray, bad: np.ndarray) -> str:
    """One offending value, for the message (the first flagged, else the first)."""
    if array.size == 0:
        return "[]"
    value = array[bad].flat[0] if bad.any() else array.flat[0]
    return repr(value.item() if isinstance(value, np.generic) else value)


def convert(value: Any, dtype: str, *, name: str, role: str = "input") -> np.ndarray:
    """`value` as an array of `dtype`; `InvalidRequest` when that would change a value."""
    what = f"{role} {name!r}"
    target = np.dtype(dtype)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InvalidRequest(f"{what}: not an array of {target.name}: {exc}") from None
    source = array.dtype
    if source == target:
        return array
    if source.kind not in "biuf":
        raise InvalidRequest(
            f"{what}: expected {target.name} values, got {source.name} "
            f"(e.g. {_example(array, np.zeros(array.shape, bool))})"
        )
    if target.kind not in "biuf":
        raise InvalidRequest(
            f"{what}: the model takes {target.name}, which this client cannot send"
        )
    if source.kind == "b":
        if target.kind == "b":
            return array
        return array.astype(target)
    if target.kind == "b":
        raise InvalidRequest(
            f"{what}: expected bool values, got {source.name} (e.g. {_example(array, array != 0)})"
        )
    if source.kind == "f" and target.kind in "iu":
        fractional = ~np.isfinite(array) | (array != np.round(array))
        raise InvalidRequest(
            f"{what}: expected {target.name} (integers), got {source.name} values "
            f"(e.g. {_example(array, fractional)}): pass integers"
        )
    if source.kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            raise InvalidRequest(
                f"{what}: {_example(array, outside)} does not fit {target.name} "
                f"({info.min} to {info.max})"
            )
        return array.astype(target)
    with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
        converted = array.astype(target)
    if source.kind in "iu":  # to a float: exactly representable only
        changed = converted.astype(source) != array
        if changed.any():
            raise InvalidRequest(
                f"{what}: {_example(array, changed)} is not exactly a {target.name}"
            )
        return converted
    # float to float: rounding, but no overflow to infinity
    overflow = np.isfinite(array) & ~np.isfinite(converted)
    if overflow.any():
        raise InvalidRequest(
            f"{what}: {_example(array, overflow)} is out of the range of {target.name}"
        )
    return converted
