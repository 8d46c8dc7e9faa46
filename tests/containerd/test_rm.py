"""`imagestream rm` takes the image's tag off the regional OCI endpoint: containerd can pull it before, not after."""

from __future__ import annotations

import os

import pytest

from tests.conftest import run_cli
from tests.containerd.conftest import needs_containerd, registry_host

pytestmark = [pytest.mark.services, needs_containerd]


def test_containerd_cannot_pull_a_removed_image(containerd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev import imagebuild

    layout = imagebuild.layout_of_files({"etc/removed": os.urandom(100_000)}, tmp_path / "removed", tmp_path)
    run_cli("push", "-q", str(layout), "lifecycle/removed:v1")
    ref = f"{registry_host()}/lifecycle/removed:v1"
    hosts = ("--hosts-dir", str(containerd.dir / "certs.d"))  # the endpoint's CA and a client certificate
    containerd.ctr("images", "pull", *hosts, ref, namespace="lifecycle-before")
    run_cli("rm", "lifecycle/removed:v1")
    after = containerd.ctr("images", "pull", *hosts, ref, namespace="lifecycle-after", check=False)
    assert after.returncode != 0
    said = after.stdout + after.stderr
    # the endpoint answers 404 (ctr then tries the reference's own host, which cannot help either)
    assert "response was http.StatusNotFound" in said or "not found" in said.lower(), said
