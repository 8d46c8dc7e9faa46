"""A real one-node Kubernetes cluster (scripts/cluster): built once and cached in $IMAGESTREAM_CACHE_DIR,
started for the session, the images of the Dockerfile built with buildah and pushed to its registry,
the `dev` overlay applied on it (imagestream_dev.cluster.deploy). Every phase's wall time is printed and
kept in cluster/timings.json.

A session of its own: `tox -e cluster`, which scripts/test runs after the main session (the main session's
pytest ignores tests/cluster; IMAGESTREAM_CLUSTER_TIER=0 scripts/test skips this one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from imagestream_dev.cluster import ENV, RUN, SCRIPTS, deploy

TIMINGS = RUN.parent / "timings.json"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, mounts, containerd)"
    for tool in ("buildah", "ip", "nsenter", "openssl", "curl", "debootstrap"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not (shutil.which("go") or os.path.exists("/usr/local/go/bin/go")):
        return "needs Go >= 1.26 to build Kubernetes, containerd and the registry"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


@pytest.fixture(scope="session")
def cluster() -> dict[str, float]:  # type: ignore[misc]
    """The running cluster with imagestream deployed (the dev overlay) and Ready; yields the phase timings."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    deploy(timings)
    TIMINGS.write_text(json.dumps(timings, indent=1))
    yield timings
    TIMINGS.write_text(json.dumps(timings, indent=1))
    if not os.environ.get("IMAGESTREAM_CLUSTER_KEEP"):
        subprocess.run([str(SCRIPTS / "down")], capture_output=True, timeout=600, env=ENV)
