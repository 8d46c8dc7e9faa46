"""The node's background downloads and pins, kept in a small file so that they survive a restart.

StartDownload arrives once, when an image is mounted; a node cache restarted
while the mount lives would otherwise forget the download and the mount's pins.
The file is replaced atomically (write, fsync, rename) on every change and read
back at start. Everything in it is checked: a corrupt or hostile file is
reported in one log line and ignored (entry by entry where possible), never a
crash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

from imagestream.digests import Digest, parse
from imagestream.errors import ImagestreamError
from imagestream.names import validate_name

log = logging.getLogger(__name__)

VERSION = 1
MAX_FILE_BYTES = 16 << 20
MAX_ENTRIES = 10_000
MAX_FIRST = 100_000  # chunks of one startup profile
MAX_MOUNT_ID = 4096 + 32  # a pid, a colon and a path


@dataclasses.dataclass(frozen=True)
class Entry:
    mount_id: str
    image: str
    index: Digest
    first: tuple[Digest, ...]
    owner: tuple[int, str] | None  # (pid, start time) of the mount's process, when this node can see it

    def to_json(self) -> dict[str, Any]:
        return {"mount_id": self.mount_id, "image": self.image, "index": [self.index.hash, self.index.size],
                "first": [[d.hash, d.size] for d in self.first], "owner": list(self.owner) if self.owner else None}

    @classmethod
    def from_json(cls, doc: Any) -> Entry:
        if not isinstance(doc, dict):
            raise ValueError("an entry is not an object")
        mount_id, image = doc.get("mount_id"), doc.get("image")
        if not isinstance(mount_id, str) or not 0 < len(mount_id) <= MAX_MOUNT_ID:
            raise ValueError(f"bad mount_id {str(mount_id)[:80]!r}")
        if not isinstance(image, str):
            raise ValueError("image is not a string")
        validate_name(image)
        first = doc.get("first")
        if not isinstance(first, list) or len(first) > MAX_FIRST:
            raise ValueError("first is not a list of at most %d digests" % MAX_FIRST)
        owner = doc.get("owner")
        if owner is not None:
            if (not isinstance(owner, list) or len(owner) != 2 or type(owner[0]) is not int or owner[0] <= 0
                    or not isinstance(owner[1], str) or not owner[1].isdigit()):
                raise ValueError(f"bad owner {str(owner)[:80]}")
            owner = (owner[0], owner[1])
        return cls(mount_id, image, _digest(doc.get("index")), tuple(_digest(d) for d in first), owner)


def _digest(value: Any) -> Digest:
    if not isinstance(value, list) or len(value) != 2 or type(value[1]) is not int:
        raise ValueError(f"bad digest {str(value)[:80]}")
    return parse(value[0], value[1])


def process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot, None if it is gone or not visible here."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def owner_of(mount_id: str) -> tuple[int, str] | None:
    """The live process a mount id names ("PID:mountpoint", as FUSE clients make them), if this node sees it."""
    pid, sep, _ = mount_id.partition(":")
    if not sep or not pid.isdigit():
        return None
    start = process_start(int(pid))
    return (int(pid), start) if start is not None else None


def owner_gone(entry: Entry) -> bool:
    """True if the mount's process is known and has exited (its pid may since have been reused)."""
    return entry.owner is not None and process_start(entry.owner[0]) != entry.owner[1]


class StateFile:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def load(self) -> list[Entry]:
        """The entries recorded; anything unreadable is logged and left out."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.error("node state file %s unreadable (%s): starting without downloads to resume", self.path, e)
            return []
        try:
            if not self.path.is_file() or self.path.is_symlink():
                raise ValueError("not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ValueError(f"{st.st_size} bytes, more than {MAX_FILE_BYTES}")
            doc = json.loads(self.path.read_bytes())
            if not isinstance(doc, dict) or doc.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} state document")
            raw = doc.get("downloads")
            if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
                raise ValueError(f"'downloads' is not a list of at most {MAX_ENTRIES} entries")
        except (OSError, ValueError, RecursionError) as e:
            log.error("node state file %s ignored, it is corrupt: %s; starting without downloads to resume",
                      self.path, str(e)[:200])
            return []
        entries = []
        for i, item in enumerate(raw):
            try:
                entries.append(Entry.from_json(item))
            except (ValueError, ImagestreamError) as e:
                log.error("node state file %s: entry %d ignored, it is corrupt: %s", self.path, i, str(e)[:200])
        return entries

    def save(self, entries: list[Entry]) -> None:
        """Replace the file atomically; a failure is logged (the node keeps working, it only forgets more on restart)."""
        data = json.dumps({"version": VERSION, "downloads": [e.to_json() for e in entries]},
                          separators=(",", ":")).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as e:
            log.error("node state file %s not written: %s", self.path, e)
            tmp.unlink(missing_ok=True)
