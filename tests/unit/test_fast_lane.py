"""The fast lane (`pytest -m "not slow"`) leaves out exactly the files tests/conftest.py
names, and every name there is a test file (a renamed file must not slip into the lane)."""

from __future__ import annotations

from tests.conftest import ROOT, SLOW_FILES


def test_every_slow_file_exists() -> None:
    missing = sorted(name for name in SLOW_FILES if not (ROOT / name).is_file())
    assert missing == []


def test_slow_files_are_test_modules() -> None:
    assert all(name.startswith("tests/") and "/test_" in name for name in SLOW_FILES)
