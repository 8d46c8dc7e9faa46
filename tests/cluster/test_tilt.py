"""`tilt ci` of the project's Tiltfile on the cluster: the four images built by buildah (custom_build)
and pushed to the cluster's registry, which Tilt reads from the cluster (KEP-1755); the dev overlay
deployed with them; the smoke test's pod on the streamed image.

It starts from a cluster without imagestream, as a developer's first `tilt up` does: over the session's
deployment Tilt's labels would roll every pod, and `tilt ci` fails on the old pods' exits."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imagestream_dev.cluster import ENV, NAMESPACES, SCRIPTS, kubectl, secrets
from tests.deploy.tilt_ci import tilt_ci

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]  # the first one waits for the cluster to be built


def test_tilt_ci_builds_deploys_and_smoke_tests_on_the_cluster(cluster, debian_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    kubectl("delete", "namespace", *NAMESPACES, "--wait=true", timeout=600)
    subprocess.run([str(SCRIPTS / "up")], check=True, capture_output=True, env=ENV, timeout=600)  # frees the volumes
    secrets()  # the TLS Secrets that cert-manager would keep, which a developer installs before `tilt up`
    env = {**ENV, "PYTHON": sys.executable, "SMOKE_IMAGE": str(debian_image)}
    started = time.monotonic()
    result = tilt_ci(env, tmp_path / "tilt-home", 26390, ["--mode=k8s", "--builder=buildah"], timeout_s=1800,
                     prefix=["nsenter", f"--net=/run/netns/{ENV['NS']}"])
    cluster["tilt-ci-cluster"] = round(time.monotonic() - started, 1)
    print(f"tilt ci (cluster) in {cluster['tilt-ci-cluster']} s")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "smoke-test: ok (k8s)" in output
    for image in ("chunk-store", "zonal-cache", "node-agent", "snapshotter"):
        assert f"{ENV['REGISTRY']}/{image}:tilt-" in output, f"{image}: not built and pushed by custom_build"
