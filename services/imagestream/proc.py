"""Small helpers about processes, shared by the stack and the mounts."""

from __future__ import annotations

import os
import pathlib


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
