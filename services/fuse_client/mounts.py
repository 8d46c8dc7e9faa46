"""Mounting images on this node: start a FUSE client per mount, track it, unmount it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

from imagestream import config
from imagestream.proc import alive
from imagestream.errors import ImagestreamError


class MountError(ImagestreamError):
    pass


@dataclasses.dataclass
class Mount:
    name: str
    mountpoint: str
    pid: int
    mount_seconds: float
    index: str
    log: str

    @classmethod
    def find(cls, mountpoint: str) -> Mount:
        record = _record(os.path.realpath(mountpoint))
        if not record.exists():
            raise MountError(f"{mountpoint} is not mounted by imagestream")
        return cls(**json.loads(record.read_text()))


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


def mount(name: str, mountpoint: str | os.PathLike, timeout_s: float = 60.0, download: bool = True) -> Mount:
    """Mount image `name` read-only on `mountpoint`; returns once it is served.

    With `download`, the node then fetches the whole image in the background.
    """
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise MountError(f"mount point {mp} is not a directory")
    if is_mountpoint(mp):
        raise MountError(f"{mp} is already a mount point")
    log_path = config.home() / "logs" / f"fuse-{_record(mp).stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "IMAGESTREAM_HOME": str(config.home())}
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "fuse_client", name, mp, "--ready-fd", str(write_end),
             *([] if download else ["--no-download"])],
            pass_fds=(write_end,), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        line = ready.readline()  # the child writes one line, or closes the pipe by dying
    try:
        reply = json.loads(line) if line else {"error": f"FUSE client exited ({child.wait(timeout_s)}); see {log_path}"}
    except json.JSONDecodeError:
        reply = {"error": f"FUSE client said {line!r}; see {log_path}"}
    if "error" in reply:
        raise MountError(reply["error"])
    m = Mount(name, mp, child.pid, reply["mount_seconds"], reply["index"], str(log_path))
    _record(mp).write_text(json.dumps(dataclasses.asdict(m)))
    return m


def unmount(mountpoint: str | os.PathLike, timeout_s: float = 20.0) -> None:
    mp = os.path.realpath(mountpoint)
    record = _record(mp)
    pid = None
    if record.exists():
        pid = json.loads(record.read_text())["pid"]
    if is_mountpoint(mp):
        result = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if result.returncode != 0:
            # busy: detach lazily so the mount goes away as soon as its last user does
            lazy = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
            if lazy.returncode != 0:
                raise MountError(f"cannot unmount {mp}: {result.stderr.strip() or lazy.stderr.strip()}")
    elif pid is None:
        raise MountError(f"{mp} is not mounted")
    if pid is not None:
        deadline = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, 9)
    record.unlink(missing_ok=True)



def list_mounts() -> list[Mount]:
    """Mounts this node's home knows of; records of mounts that are gone are dropped."""
    out = []
    for record in sorted(_records().glob("*.json")):
        m = Mount(**json.loads(record.read_text()))
        if alive(m.pid) or is_mountpoint(m.mountpoint):
            out.append(m)
        else:
            record.unlink(missing_ok=True)
    return out
