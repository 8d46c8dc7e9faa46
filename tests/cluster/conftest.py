"""A real one-node Kubernetes cluster (scripts/cluster): built once and cached in $IMAGESTREAM_CACHE_DIR,
started for the session, the images of the Dockerfile built with buildah and pushed to its registry,
the `dev` overlay applied on it. Every phase's wall time is printed and kept in cluster/timings.json."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time

import pytest

from tests.conftest import CACHE, ROOT

SCRIPTS = ROOT / "scripts" / "cluster"
NAMESPACES = ("imagestream", "imagestream-node")


def cluster_env() -> dict[str, str]:
    """The variables of scripts/cluster/env, as the scripts see them."""
    out = subprocess.run(["bash", "-c", f". {SCRIPTS / 'env'} && env -0"], capture_output=True, check=True,
                         env={**os.environ, "IMAGESTREAM_CACHE_DIR": str(CACHE)}).stdout
    return dict(line.split("=", 1) for line in out.decode().split("\0") if "=" in line)


ENV = cluster_env()
TIMINGS = pathlib.Path(ENV["IMAGESTREAM_CLUSTER_RUN"]).parent / "timings.json"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, mounts, containerd)"
    for tool in ("buildah", "ip", "openssl", "curl", "debootstrap"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not (shutil.which("go") or os.path.exists("/usr/local/go/bin/go")):
        return "needs Go >= 1.26 to build Kubernetes, containerd and the registry"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


def in_ns(*argv: str, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ENV['NS']}", *argv], capture_output=True, text=True, check=check,
                          timeout=timeout, input=input, env=ENV)


def kubectl(*args: str, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    result = in_ns("kubectl", *args, check=False, timeout=timeout, input=input)
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: rc {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def timed(phase: str, timings: dict[str, float], argv: list[str], timeout: float) -> None:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)
    timings[phase] = round(time.monotonic() - started, 1)
    print(f"phase {phase}: {timings[phase]} s\n{result.stdout}")
    if result.returncode:
        raise AssertionError(f"{' '.join(argv)}: rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def dev_overlay(registry: str) -> pathlib.Path:
    """The dev overlay with the images this session built, as `kustomize edit set image` would name them."""
    folder = pathlib.Path(ENV["IMAGESTREAM_CLUSTER_RUN"]) / "deploy"
    folder.mkdir(parents=True, exist_ok=True)
    overlay = os.path.relpath(ROOT / "k8s" / "overlays" / "dev", folder)
    images = "".join(f"  - {{name: {t}, newName: {registry}/imagestream/{t}, newTag: dev}}\n"
                     for t in ("chunk-store", "zonal-cache", "node-agent", "snapshotter"))
    (folder / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {overlay}\nimages:\n{images}")
    return folder


@pytest.fixture(scope="session")
def cluster() -> dict[str, float]:  # type: ignore[misc]
    """The running cluster with imagestream deployed (the dev overlay) and Ready; yields the phase timings."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    timed("build-binaries", timings, [str(SCRIPTS / "build")], 3600)
    timed("cluster-up", timings, [str(SCRIPTS / "up")], 600)
    registry = ENV["REGISTRY"]
    # built on this machine's network (PyPI, Debian), pushed from the cluster's namespace
    push = ["--netns", ENV["NS"], "--push", registry]
    timed("build-images", timings, [str(SCRIPTS / "images"), *push], 3600)
    timed("build-third-party-images", timings, [str(SCRIPTS / "images"), "--third-party", *push], 3600)
    started = time.monotonic()
    kubectl("apply", "-k", str(dev_overlay(registry)))
    for namespace in NAMESPACES:  # every workload rolled out: Cassandra, chunk store, Redis, zonal cache, Zipkin, node agent
        for kind in ("statefulset", "deployment", "daemonset"):
            for name in kubectl("get", kind, "-n", namespace, "-o", "name").stdout.split():
                kubectl("rollout", "status", "-n", namespace, name, "--timeout=900s", timeout=960)
    timings["deploy-ready"] = round(time.monotonic() - started, 1)
    print(f"phase deploy-ready: {timings['deploy-ready']} s")
    TIMINGS.write_text(json.dumps(timings, indent=1))
    yield timings
    if not os.environ.get("IMAGESTREAM_CLUSTER_KEEP"):
        subprocess.run([str(SCRIPTS / "down")], capture_output=True, timeout=600, env=ENV)
