"""Images on a mount point of the user's choice: the image's directory in the node's FUSE mount, bound there.

No process is started per mount: the node's FUSE client (`python -m fuse_client`)
serves every image. `mount` attaches the image under the lease "mount:<path>" and
bind-mounts its directory; `unmount` undoes both. A record per mount point (in
HOME/mounts) says which image it shows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import pathlib

from imagestream import config
from imagestream.errors import ImagestreamError

MS_BIND = 0x1000
MNT_DETACH = 0x2


class MountError(ImagestreamError):
    pass


@dataclasses.dataclass
class Mount:
    name: str
    mountpoint: str
    pid: int  # the node's FUSE client
    mount_seconds: float
    index: str
    source: str = ""  # the image's directory in the node's mount
    lease: str = ""
    download_id: str = ""

    @classmethod
    def find(cls, mountpoint: str) -> Mount:
        record = _record(os.path.realpath(mountpoint))
        if not record.exists():
            raise MountError(f"{mountpoint} is not mounted by imagestream")
        return cls.load(record)

    @classmethod
    def load(cls, record: pathlib.Path) -> Mount:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(record.read_text()).items() if k in fields})


def _records() -> pathlib.Path:
    d = config.home() / "mounts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _record(mountpoint: str) -> pathlib.Path:
    return _records() / (hashlib.sha256(mountpoint.encode()).hexdigest()[:16] + ".json")


def is_mountpoint(path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def answers(path: str | os.PathLike) -> bool:
    """Something serves the mount at `path` (a dead FUSE mount answers ENOTCONN)."""
    try:
        os.listdir(path)
    except OSError as e:
        return e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    return True


_libc = None


def _sys(call: str, *args) -> None:  # type: ignore[no-untyped-def]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, call)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def bind(source: str, target: str) -> None:
    _sys("mount", source.encode(), target.encode(), None, ctypes.c_ulong(MS_BIND), None)


def detach_mountpoint(mountpoint: str) -> None:
    """Unmount, lazily if busy (the mount goes as soon as its last user does)."""
    try:
        _sys("umount2", mountpoint.encode(), 0)
    except OSError as e:
        if e.errno == errno.EINVAL:  # not a mount point (any more)
            return
        _sys("umount2", mountpoint.encode(), MNT_DETACH)


def forget(mountpoint: str) -> None:
    _record(mountpoint).unlink(missing_ok=True)


def mount(name: str, mountpoint: str | os.PathLike, timeout_s: float = 60.0, download: bool = True) -> Mount:
    """Show image `name` read-only on `mountpoint`; returns once it is served.

    With `download`, the node then fetches the whole image in the background.
    """
    from fuse_client import attach

    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise MountError(f"mount point {mp} is not a directory")
    if is_mountpoint(mp):
        raise MountError(f"{mp} is already a mount point")
    lease = "mount:" + mp
    try:
        attached = attach.attach(name, lease, download=download, timeout_s=timeout_s)
    except ImagestreamError as e:
        raise MountError(f"cannot mount {name!r}: {e}") from None
    try:
        bind(attached.path, mp)
    except OSError as e:
        attach.detach(lease)
        raise MountError(f"cannot bind {attached.path} on {mp}: {e.strerror}") from None
    m = Mount(name, mp, attached.pid, attached.attach_seconds, attached.index, attached.path, lease,
              attached.download_id)
    _record(mp).write_text(json.dumps(dataclasses.asdict(m)))
    return m


def unmount(mountpoint: str | os.PathLike) -> None:
    from fuse_client import attach

    mp = os.path.realpath(mountpoint)
    record = _record(mp)
    m = Mount.load(record) if record.exists() else None
    if is_mountpoint(mp):
        try:
            detach_mountpoint(mp)
        except OSError as e:
            raise MountError(f"cannot unmount {mp}: {e.strerror}") from None
    elif m is None:
        raise MountError(f"{mp} is not mounted")
    if m is not None and m.lease:
        try:
            attach.detach(m.lease)
        except attach.NotServing:
            pass  # the FUSE client is gone, and every lease with it
    record.unlink(missing_ok=True)


def list_mounts() -> list[Mount]:
    """Mounts this node's home knows of; records of mounts that are gone are dropped."""
    out = []
    for record in sorted(_records().glob("*.json")):
        m = Mount.load(record)
        if is_mountpoint(m.mountpoint):
            out.append(m)
        else:
            record.unlink(missing_ok=True)
    return out
