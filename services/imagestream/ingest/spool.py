"""The folder `push` converts into: removed on every exit of the push that made it.

A push can spool hundreds of MB. Normal return, an error, Ctrl-C and SIGTERM
all remove the folder (SIGTERM is turned into an exception for the duration of
the push so that the same `finally` runs). SIGKILL cannot be caught: each folder
records its owner's pid and process start time, and the next push removes the
folders whose owner is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

PREFIX = "imagestream-push-"
OWNER = "owner"
# a folder without a readable owner record (killed between mkdir and writing it) is left this long
UNOWNED_GRACE_S = 600.0


class Terminated(SystemExit):
    """SIGTERM received during a push."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is the state (field 3); a zombie has finished
    if not fields or fields[0] == "Z" or len(fields) < 20:
        return None
    return fields[19]


def _owner_alive(record: str) -> bool | None:
    """True if the recorded owner still runs, False if gone, None if the record is unreadable."""
    parts = record.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    # the start time tells a reused pid from the owner
    return _start_time(int(parts[0])) == parts[1]


def sweep(parent: pathlib.Path) -> list[pathlib.Path]:
    """Remove spools under `parent` left by pushes that no longer run; returns what was removed."""
    removed = []
    try:
        candidates = list(parent.glob(PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        try:
            st = path.lstat()
        except OSError:
            continue
        # only this user's real folders: the temp dir is shared, a symlink or another user's folder stays
        if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid():
            continue
        try:
            alive = _owner_alive((path / OWNER).read_text())
        except (OSError, UnicodeDecodeError):
            alive = None
        if alive or (alive is None and time.time() - st.st_mtime < UNOWNED_GRACE_S):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log.warning("removed the spool of a push that did not finish: %s", path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):  # type: ignore[no-untyped-def]
        raise Terminated(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the caller owns signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def push_spool(parent: pathlib.Path | None = None) -> Iterator[pathlib.Path]:
    """A fresh spool folder under `parent` (default: the temp dir), removed on exit; sweeps stale ones first."""
    parent = pathlib.Path(parent or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    path = pathlib.Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    try:
        with _sigterm_raises():
            record = path / (OWNER + ".tmp")
            record.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
            record.rename(path / OWNER)
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
