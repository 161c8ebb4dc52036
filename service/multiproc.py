"""The Prometheus multiprocess folder, cleaned of dead processes' files at start.

prometheus-client's multiprocess mode keeps each process's samples in files of the
folder named by `PROMETHEUS_MULTIPROC_DIR`, `<kind>_<pid>.db`, and never removes them by
itself: after a `kill -9` and a restart, the dead process's live gauges (queue depth,
models loaded) are still summed into every scrape, and a new process whose pid is the
dead one's (pid 1 in every container) carries on from its old values.

    claim = claim_multiprocess_dir(os.environ.get(MULTIPROC_ENV))   # before any metric exists

Every live process holds a shared `flock` on the folder's `.rnnserve.lock` for as long
as it runs (the claim keeps the file open). A process that gets the lock exclusively
is the only live one: every metric file there is a dead process's, and it removes
them, with the private folders of dead supervisors (`rnnserve-metrics-*`), before it
turns its lock into a shared one. A process joining live ones removes only the files
of its own pid (a dead process's, whose pid it reused).

Safety: an unset or empty folder is a no-op (never the current folder), and only
prometheus-client's own file names and the supervisor's folders are ever removed, so a
variable naming the wrong folder costs nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "LOCK_NAME",
    "MULTIPROC_ENV",
    "SUPERVISOR_PREFIX",
    "MultiprocClaim",
    "claim_multiprocess_dir",
    "is_metric_file",
]

logger = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME: Final = ".rnnserve.lock"
# The supervisor's private folders (`tempfile.mkdtemp(prefix=...)`, supervisor.py).
SUPERVISOR_PREFIX: Final = "rnnserve-metrics-"
# prometheus_client/values.py: `{typ}_{pid}.db`, gauges as `gauge_{multiprocess_mode}`.
_METRIC_FILE: Final = re.compile(
    r"(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))_(\d+)\.db"
)
_SUPERVISOR_FOLDER: Final = re.compile(re.escape(SUPERVISOR_PREFIX) + r"[A-Za-z0-9_]+")


def is_metric_file(name: str) -> int | None:
    """The pid of a prometheus-client metric file's name; None for any other name."""
    match = _METRIC_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass
class MultiprocClaim:
    """This process's share of the folder: the lock is held until `release()` (or exit)."""

    folder: Path
    first: bool  # no other live process: dead processes' files were removed
    removed: list[str] = field(default_factory=list)
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def describe(self) -> str:
        who = "first live process" if self.first else "joined live processes"
        return f"{self.folder} ({who}; removed {len(self.removed)} stale file(s))"


def _remove(entry: Path, removed: list[str]) -> None:
    with contextlib.suppress(FileNotFoundError):  # another process was first
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)


def claim_multiprocess_dir(folder: str | os.PathLike[str] | None) -> MultiprocClaim | None:
    """Take this process's share of the metrics folder, removing what dead processes
    left there (see the module docstring). None, doing nothing at all, when `folder` is
    unset or empty or not an existing folder. Call it before any metric is created."""
    if folder is None or not os.fspath(folder).strip():
        return None  # never "": Path("") is the current folder
    path = Path(folder).absolute()
    if not path.is_dir() or path.is_symlink():
        return None
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = True
        except BlockingIOError:  # live processes hold it (or one is cleaning up now)
            fcntl.flock(fd, fcntl.LOCK_SH)
            first = False
        removed: list[str] = []
        own = os.getpid()
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            pid = is_metric_file(name)
            if pid is not None:
                remove = first or pid == own
            else:
                remove = (
                    first and bool(_SUPERVISOR_FOLDER.fullmatch(name)) and (path / name).is_dir()
                )
            if remove:
                _remove(path / name, removed)
        if first:  # shared from now on: others may join (and, while we live, not clean up)
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return MultiprocClaim(path, first, removed, fd)
