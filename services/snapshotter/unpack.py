"""Unpack a layer blob the way containerd's overlayfs snapshotter holds it (the rare fallback for a layer
of a streamed image that must exist on its own, see Snapshotter._materialize).

The blob comes from the regional tier's OCI endpoint and is checked against its
digest; GNU tar unpacks it (owners, modes, xattrs, links, devices, any of
gzip/zstd/plain); OCI whiteouts become overlay ones as imagestream.whiteouts says (the
rule the converter follows too): `.wh.NAME` a 0/0 character device NAME, or, where the
layer itself has a directory NAME, that directory's trusted.overlay.opaque=y;
`.wh..wh..opq` the directory's trusted.overlay.opaque=y.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import urllib.request

from imagestream import whiteouts
from imagestream.digests import HashingStream
from imagestream.errors import BadImage, Unavailable


def fetch_blob(registry: str, digest: str, out: pathlib.Path, repository: str = "imagestream") -> None:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/{repository}/blobs/{digest}", timeout=60) as r, \
                open(out, "wb") as f:
            written = HashingStream(f)
            shutil.copyfileobj(r, written, 1 << 20)
    except OSError as e:
        raise Unavailable(f"cannot fetch layer {digest} from {registry}: {e}") from None
    if written.oci_digest() != digest:
        raise BadImage(f"layer {digest} from {registry} does not match its digest")


def unpack(blob: pathlib.Path, dest: pathlib.Path) -> None:
    dest.mkdir(parents=True)
    result = subprocess.run(["tar", "-xpf", str(blob), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                             "-C", str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BadImage(f"cannot unpack layer {blob.name}: {result.stderr.strip()[-500:]}")
    found: list[tuple[str, whiteouts.Whiteout]] = []
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in filenames + dirnames:
            rel = os.path.relpath(os.path.join(dirpath, name), dest)
            try:
                whiteout = whiteouts.parse(rel)
            except BadImage as e:
                raise BadImage(f"layer {blob.name}: {e}") from None
            if whiteout is not None:
                found.append((rel, whiteout))
        dirnames[:] = [d for d in dirnames if whiteouts.parse(d) is None]
    # every entry of the layer is in place by now, so whatever the tar's order its own entries stay
    for rel, whiteout in found:
        path = dest / rel
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        target = dest / whiteout.target
        if not os.path.lexists(target):
            layered = whiteouts.Layered.NOTHING
        elif target.is_dir() and not target.is_symlink():
            layered = whiteouts.Layered.DIRECTORY
        else:
            layered = whiteouts.Layered.OTHER
        effect = whiteouts.effect(whiteout, layered)
        if effect is whiteouts.Effect.REMOVE:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif effect is whiteouts.Effect.EMPTY:
            os.setxattr(target, "trusted.overlay.opaque", b"y")
