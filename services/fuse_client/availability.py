"""Whether this node can stream images at all (FUSE, fusermount3, the streaming setting).

Asked on every container start (`imagestream run`, the snapshotter), so it imports next to nothing.
"""

from __future__ import annotations

import os
import shutil

from imagestream import config


def streaming_unavailable_reason(image_streaming_disabled: bool = False) -> str | None:
    """Why this node cannot stream an image, or None if it can."""
    setting = config.get("streaming")
    if setting not in ("auto", "off"):
        raise ValueError(f"IMAGESTREAM_STREAMING={setting!r}: want auto or off")
    if setting == "off":
        return "streaming is turned off on this node (IMAGESTREAM_STREAMING=off)"
    if image_streaming_disabled:
        return "the image was pushed with streaming disabled (imagestream push --no-streaming)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist on this node"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None
