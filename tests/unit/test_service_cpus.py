"""`available_cpus`: the affinity mask, capped by a cgroup v2 CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rnnserve.service.settings import available_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", AFFINITY),  # no limit
        ("100000 100000\n", 1),  # one CPU
        ("150000 100000\n", min(AFFINITY, 2)),  # 1.5 CPUs: a second, partly
        ("50000 100000\n", 1),  # half a CPU: still one thread
        (f"{(AFFINITY + 8) * 100000} 100000\n", AFFINITY),  # a limit above the mask
        ("garbage\n", AFFINITY),
    ],
)
def test_cgroup_limit_caps_the_affinity(tmp_path: Path, cpu_max: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert available_cpus(path) == expected


def test_no_cgroup_file_means_the_affinity(tmp_path: Path) -> None:
    assert available_cpus(tmp_path / "absent") == AFFINITY
