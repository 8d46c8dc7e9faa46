"""imagestream on a real one-node Kubernetes cluster (conftest.py): the dev overlay Ready, a pod started
from a streamed image (its layer never fetched, its reads on demand, the ImageStreaming event on it),
pod start streamed vs the same image pulled normally, the snapshotter's restart under a running pod,
the multi-zone overlay against the real API server, and the chunk store following Cassandra to a new pod."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from imagestream_dev.cluster import (ENV, NAMESPACES, RUN, chunk_store_forwarded, cold_node, content_digests, ctr,
                                     forget_image, image_digest, in_ns, kubectl, metrics, push_both_ways, pusher_tls, run_pod)
from tests.conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]  # the first one waits for the cluster to be built

STREAMED = "debian-python:cluster"
PROGRAM = ("import json, sqlite3, hashlib; "
           "print(json.dumps({'sqlite': sqlite3.sqlite_version, 'h': hashlib.sha256(b'x').hexdigest()[:8]}), flush=True)")
COMMAND = ["python3", "-c", PROGRAM]
EXPECTED = {"sqlite": "3.40.1", "h": "2d711642"}


@pytest.fixture(scope="module")
def pushed(cluster, debian_image):  # type: ignore[no-untyped-def]
    """The Debian + python3 image in the cluster's regional store (streamable), and in the registry (normal)."""
    refs = push_both_ways(debian_image, STREAMED)
    forget_image(refs["streamed"], refs["normal"], config=refs["config"])  # a cold node for this module: no image, empty caches
    cold_node()
    return refs


def test_every_tier_is_ready(cluster) -> None:  # type: ignore[no-untyped-def]
    pods = {}
    for namespace in NAMESPACES:
        for pod in json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]:
            if pod["metadata"]["labels"]["app"] == "chunk-store-schema":  # the schema Job's: it has run, and ended
                assert pod["status"]["phase"] == "Succeeded", pod["status"]
                continue
            ready = [c["ready"] for c in pod["status"].get("containerStatuses", [])]
            pods[pod["metadata"]["labels"]["app"]] = bool(ready) and all(ready)
    assert pods == dict.fromkeys(["cassandra", "chunk-store", "redis", "zonal-cache", "zipkin", "node-agent"], True)
    job = json.loads(kubectl("get", "job", "-n", "imagestream", "chunk-store-schema", "-o", "json").stdout)
    assert job["status"].get("succeeded") == 1
    snapshotter = json.loads(kubectl("get", "pods", "-n", "imagestream-node", "-o", "json").stdout)["items"][0]
    containers = {c["name"]: c["image"] for c in snapshotter["spec"]["containers"]}
    # the image built here (scripts/cluster/images), by the digest the registry holds
    assert containers["snapshotter"] == f"{ENV['REGISTRY']}/imagestream/snapshotter@{image_digest(ENV['REGISTRY'], 'snapshotter')}"


def test_a_streamed_pod_reads_on_demand_and_never_fetches_the_layer(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    """Cold node: the pod prints its output while the layer blob never reaches the node's containerd, and the
    node cache fetched chunks on demand; the same pod from the registry (pulled normally) prints the same.
    How long each takes is python -m benchmarks.k8s_pod_start's (docs/kubernetes.md)."""
    assert pushed["layer"] not in content_digests()
    before = metrics(9463)
    _, out = run_pod("streamed", pushed["streamed"], True, COMMAND)
    assert json.loads(out) == EXPECTED
    assert pushed["layer"] not in content_digests(), "the streamed image's layer blob was fetched"
    after = metrics(9463)
    blocking = 'imagestream_node_upstream_fetches_total{kind="blocking"}'
    assert after.get(blocking, 0) > before.get(blocking, 0), "read on demand while it started"
    _, out = run_pod("normal", pushed["normal"], False, COMMAND)
    assert json.loads(out) == EXPECTED


def test_snapshotter_streamed_the_layer_for_the_containers(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    before = metrics(9464)
    _, out = run_pod("streamed-check", pushed["streamed"], True, COMMAND)
    assert json.loads(out) == EXPECTED
    after = metrics(9464)
    key = "imagestream_snapshotter_streamed_snapshots_total"
    assert after[key] > before.get(key, 0), "the container's snapshot is not on the streamed image"
    assert after["imagestream_snapshotter_materialized_layers_total"] == 0
    # the layer is a committed snapshot of imagestream's snapshotter, and its blob is not on the node
    committed = ctr("snapshots", "--snapshotter", "imagestream", "ls").stdout
    assert re.search(rf"^{re.escape(pushed['chain_id'])}\s+Committed", committed, flags=re.M), committed
    assert pushed["layer"] not in content_digests()


def test_image_streaming_event_is_on_the_pod(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    run_pod("streamed-event", pushed["streamed"], True, COMMAND)
    uid = kubectl("get", "pod", "streamed-event", "-o", "jsonpath={.metadata.uid}").stdout
    deadline = time.monotonic() + 30
    while True:  # this pod's event: an earlier pod of the same name may have left one (events last an hour)
        events = json.loads(kubectl("get", "events", "-n", "default", "--field-selector",
                                    f"involvedObject.uid={uid},reason=ImageStreaming", "-o", "json").stdout)["items"]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert events, "no ImageStreaming event on the pod"
    involved = events[0]["involvedObject"]
    assert (involved["kind"], involved["name"], involved["namespace"], involved["uid"]) == ("Pod", "streamed-event", "default", uid)
    assert STREAMED in events[0]["message"]


def test_no_pod_loses_its_root_when_the_snapshotter_restarts(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    loop = "import time, sqlite3\nwhile True:\n    print(sqlite3.sqlite_version, flush=True)\n    time.sleep(1)\n"
    run_pod("long-running", pushed["streamed"], True, ["python3", "-c", loop])
    agent = kubectl("get", "pod", "-n", "imagestream-node", "-l", "app=node-agent", "-o", "jsonpath={.items[0].metadata.name}").stdout
    restarts = lambda: json.loads(kubectl("get", "pod", "-n", "imagestream-node", agent, "-o", "json").stdout)[  # noqa: E731
        "status"]["containerStatuses"]
    before = {c["name"]: c["restartCount"] for c in restarts()}
    # the image has no kill(1): its interpreter sends the signal to PID 1 (tini, which passes it on)
    kubectl("exec", "-n", "imagestream-node", agent, "-c", "snapshotter", "--", "python", "-c", "import os; os.kill(1, 15)")
    deadline = time.monotonic() + 120  # it drains first, then exits, and the kubelet starts it again
    while (after := {c["name"]: c["restartCount"] for c in restarts()})["snapshotter"] == before["snapshotter"]:
        assert time.monotonic() < deadline, "the snapshotter container did not restart"
        time.sleep(1)
    assert after == {**before, "snapshotter": before["snapshotter"] + 1}  # the other containers kept running
    kubectl("wait", "-n", "imagestream-node", f"pod/{agent}", "--for=condition=Ready", "--timeout=180s", timeout=200)
    # a new process in the running pod still reads its image: files it never read before, too
    result = kubectl("exec", "long-running", "--", "python3", "-c", "import email.parser, http.client; print('alive')",
                     check=False)
    assert result.stdout.strip() == "alive", result.stderr
    assert kubectl("get", "pod", "long-running", "-o", "jsonpath={.status.phase}").stdout == "Running"


def test_multi_zone_overlay_is_valid_for_the_api_server(cluster) -> None:  # type: ignore[no-untyped-def]
    """As a fresh install beside the dev overlay that runs: every name prefixed (an update of dev's Cassandra
    StatefulSet would be refused for its volume claims), and the one node port dev holds moved."""
    check = RUN / "multi-zone-check"
    check.mkdir(parents=True, exist_ok=True)
    overlay = os.path.relpath(ROOT / "k8s" / "overlays" / "multi-zone", check)
    (check / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {overlay}\nnamePrefix: check-\npatches:\n"
        "  - target: {kind: Service, name: chunk-store-registry}\n"
        "    patch: '[{\"op\": \"replace\", \"path\": \"/spec/ports/0/nodePort\", \"value\": 30051}]'\n")
    result = kubectl("apply", "-k", str(check), "--dry-run=server", check=False)
    assert result.returncode == 0, result.stderr
    created = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("created (server dry run)")]
    rendered = kubectl("kustomize", str(ROOT / "k8s" / "overlays" / "multi-zone")).stdout
    kinds = [line.split()[1] for line in rendered.splitlines() if line.startswith("kind: ")]
    assert len(created) == len(kinds) - kinds.count("Namespace"), result.stdout  # every object but the namespaces
    assert {"daemonset.apps/check-node-agent", "statefulset.apps/check-cassandra"} <= set(created)


def test_the_chunk_store_follows_cassandra_to_a_new_pod(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    """Cassandra's pod deleted and made again (a new address behind the Service's name): the chunk store
    answers again from Cassandra without being restarted."""
    def cassandra() -> dict:
        return json.loads(kubectl("get", "pod", "-n", "imagestream", "cassandra-0", "-o", "json").stdout)

    def chunk_store_restarts() -> int:
        pods = json.loads(kubectl("get", "pods", "-n", "imagestream", "-l", "app=chunk-store", "-o", "json").stdout)["items"]
        return sum(c["restartCount"] for p in pods for c in p["status"]["containerStatuses"])

    def images() -> subprocess.CompletedProcess:
        with chunk_store_forwarded() as region:
            return in_ns("env", *pusher_tls(), f"IMAGESTREAM_REGION={region}", str(ROOT / ".venv" / "bin" / "imagestream"),
                         "images", check=False, timeout=120)

    assert STREAMED in images().stdout
    old_ip, restarts = cassandra()["status"]["podIP"], chunk_store_restarts()
    kubectl("delete", "pod", "-n", "imagestream", "cassandra-0", "--wait=true", timeout=300)
    kubectl("wait", "-n", "imagestream", "pod/cassandra-0", "--for=condition=Ready", "--timeout=600s", timeout=660)
    new_ip = cassandra()["status"]["podIP"]
    assert new_ip != old_ip, f"Cassandra came back at the same address {new_ip}: nothing to follow"
    deadline = time.monotonic() + 120
    while STREAMED not in (listed := images()).stdout:
        assert time.monotonic() < deadline, f"the chunk store does not read Cassandra at {new_ip}: {listed.stderr}"
        time.sleep(3)
    assert chunk_store_restarts() == restarts  # recovered in place, not by a restart
