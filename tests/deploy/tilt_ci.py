"""Running the real Tilt (`tilt ci`) on the project's Tiltfile: where the binary is, its environment."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tilt_binary() -> str:
    """`tilt` on PATH, or $IMAGESTREAM_TILT; the test skips without one (install: https://docs.tilt.dev/install.html)."""
    found = os.environ.get("IMAGESTREAM_TILT") or shutil.which("tilt")
    if not found or not os.access(found, os.X_OK):
        pytest.skip("needs Tilt: `tilt` on PATH or IMAGESTREAM_TILT (https://docs.tilt.dev/install.html)")
    return found


def tilt_ci(env: dict[str, str], home: pathlib.Path, port: int, args: list[str], timeout_s: float,
            prefix: list[str] = ()) -> subprocess.CompletedProcess:  # type: ignore[assignment]
    """`tilt ci` of the repository's Tiltfile, Tilt's own state in `home`, its API on loopback `port`."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [*prefix, tilt_binary(), "ci", "--port", str(port), "--host", "127.0.0.1", "--timeout", f"{int(timeout_s)}s",
         "--file", str(ROOT / "Tiltfile"), "--", *args],
        cwd=ROOT, env={**env, "HOME": str(home), "TILT_DISABLE_ANALYTICS": "1"}, capture_output=True, text=True,
        timeout=timeout_s + 60)
