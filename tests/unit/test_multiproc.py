"""The multiprocess metrics folder: who may remove what (service/multiproc.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rnnserve.service.metrics import MULTIPROC_ENV
from rnnserve.service.multiproc import LOCK_NAME, claim_multiprocess_dir, is_metric_file

METRIC_FILES = ("counter_11.db", "gauge_livesum_11.db", "histogram_12.db", "gauge_all_12.db")
OTHER_FILES = ("notes.txt", "counter_x.db", "counter_11.db.bak", "my_counter_11.db", "gauge_11.db")


def _populate(folder: Path) -> None:
    for name in (*METRIC_FILES, *OTHER_FILES):
        (folder / name).write_bytes(b"x")
    (folder / "rnnserve-metrics-abc123").mkdir()
    (folder / "rnnserve-metrics-abc123" / "counter_5.db").write_bytes(b"x")
    (folder / "other-folder").mkdir()
    (folder / "other-folder" / "counter_5.db").write_bytes(b"x")


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_unset_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset or empty variable must never mean the current folder."""
    _populate(tmp_path)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert claim_multiprocess_dir(os.environ.get(MULTIPROC_ENV)) is None
    monkeypatch.setenv(MULTIPROC_ENV, "")
    assert claim_multiprocess_dir(os.environ.get(MULTIPROC_ENV)) is None
    for value in (None, "", "   "):
        assert claim_multiprocess_dir(value) is None
    assert claim_multiprocess_dir(tmp_path / "missing") is None
    assert _tree(tmp_path) == before  # not even the lock file


def test_the_first_live_process_removes_only_metric_files_and_supervisor_folders(
    tmp_path: Path,
) -> None:
    _populate(tmp_path)
    claim = claim_multiprocess_dir(str(tmp_path))
    assert claim is not None
    try:
        assert claim.first
        assert sorted(claim.removed) == sorted([*METRIC_FILES, "rnnserve-metrics-abc123"])
        assert _tree(tmp_path) == {
            *OTHER_FILES,
            "other-folder",
            "other-folder/counter_5.db",
            LOCK_NAME,
        }
    finally:
        claim.release()


def test_a_process_joining_live_ones_removes_only_its_own_pid(tmp_path: Path) -> None:
    live = claim_multiprocess_dir(tmp_path)
    assert live is not None and live.first
    own, other = f"gauge_livesum_{os.getpid()}.db", "gauge_livesum_999999.db"
    for name in (own, other):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "rnnserve-metrics-live").mkdir()
    joining = claim_multiprocess_dir(tmp_path)
    assert joining is not None
    try:
        assert not joining.first
        assert joining.removed == [own]
        assert (tmp_path / other).exists() and (tmp_path / "rnnserve-metrics-live").is_dir()
    finally:
        joining.release()
        live.release()
    # Everyone gone: the next process is first again and removes the rest.
    after = claim_multiprocess_dir(tmp_path)
    assert after is not None
    after.release()
    assert after.first
    assert sorted(after.removed) == [other, "rnnserve-metrics-live"]


def test_metric_file_names() -> None:
    assert is_metric_file("counter_42.db") == 42
    assert is_metric_file("gauge_livemostrecent_7.db") == 7
    assert is_metric_file("summary_1.db") == 1
    for name in ("counter_42.db.tmp", "counter_.db", "gauge_42.db", "x_counter_42.db", "42.db"):
        assert is_metric_file(name) is None
