"""Unpack a layer blob the way containerd's overlayfs snapshotter holds it (the rare fallback for a layer
of a streamed image that must exist on its own, see Snapshotter._materialize).

The blob comes from the regional tier's OCI endpoint and is checked against its
digest; GNU tar unpacks it (owners, modes, xattrs, links, devices, any of
gzip/zstd/plain); OCI whiteouts become overlay ones: `.wh.NAME` a 0/0 character
device NAME, `.wh..wh..opq` the directory's trusted.overlay.opaque=y.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import urllib.request

from imagestream.errors import BadImage, Unavailable


def fetch_blob(registry: str, digest: str, out: pathlib.Path, repository: str = "imagestream") -> None:
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/{repository}/blobs/{digest}", timeout=60) as r, \
                open(out, "wb") as f:
            while data := r.read(1 << 20):
                h.update(data)
                f.write(data)
    except OSError as e:
        raise Unavailable(f"cannot fetch layer {digest} from {registry}: {e}") from None
    if "sha256:" + h.hexdigest() != digest:
        raise BadImage(f"layer {digest} from {registry} does not match its digest")


def unpack(blob: pathlib.Path, dest: pathlib.Path) -> None:
    dest.mkdir(parents=True)
    result = subprocess.run(["tar", "-xpf", str(blob), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                             "-C", str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BadImage(f"cannot unpack layer {blob.name}: {result.stderr.strip()[-500:]}")
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in filenames + dirnames:
            if not name.startswith(".wh."):
                continue
            path = os.path.join(dirpath, name)
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                os.unlink(path)
                continue
            target = os.path.join(dirpath, name.removeprefix(".wh."))
            if os.path.lexists(target):
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.unlink(target)
            os.unlink(path) if not os.path.isdir(path) else shutil.rmtree(path)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
