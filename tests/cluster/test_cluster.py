"""imagestream on a real one-node Kubernetes cluster (conftest.py): the dev overlay Ready, a pod started
from a streamed image (its layer never fetched, its reads on demand, the ImageStreaming event on it),
pod start streamed vs the same image pulled normally, the snapshotter's restart under a running pod,
and the multi-zone overlay against the real API server."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import time

import pytest

from tests.cluster.conftest import ENV, NAMESPACES, ROOT, in_ns, kubectl
from tests.conftest import CACHE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]  # the first one waits for the cluster to be built

STREAMED = "debian-python:cluster"
PROGRAM = ("import json, sqlite3, hashlib; "
           "print(json.dumps({'sqlite': sqlite3.sqlite_version, 'h': hashlib.sha256(b'x').hexdigest()[:8]}), flush=True)")
EXPECTED = {"sqlite": "3.40.1", "h": "2d711642"}


def pod_yaml(name: str, image: str, command: list[str], streamed: bool) -> str:
    runtime = "  runtimeClassName: imagestream\n" if streamed else ""
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{runtime}"
            f"  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n"
            f"    - name: app\n      image: {image}\n      command: {json.dumps(command)}\n")


def first_output(name: str, started: float, timeout: float = 600) -> tuple[float, str]:
    """Seconds from `started` until the pod's container wrote its first line (its log file on the node)."""
    pattern = f"{ENV['IMAGESTREAM_CLUSTER_RUN']}/pod-logs/default_{name}_*/app/*.log"
    deadline = started + timeout
    while time.monotonic() < deadline:
        for path in glob.glob(pattern):
            with open(path) as f:
                line = f.readline()
            if line.endswith("\n"):
                # CRI log format: time stream tag message
                return time.monotonic() - started, line.split(" ", 3)[3].strip()
        time.sleep(0.05)
    phase = kubectl("get", "pod", name, "-o", "jsonpath={.status}", check=False).stdout
    raise AssertionError(f"pod {name} wrote nothing in {timeout} s: {phase}")


def run_pod(name: str, image: str, streamed: bool, command: list[str] | None = None) -> tuple[float, str]:
    kubectl("delete", "pod", name, "--ignore-not-found", "--wait=true")
    started = time.monotonic()
    kubectl("apply", "-f", "-", input=pod_yaml(name, image, command or ["python3", "-c", PROGRAM], streamed))
    return first_output(name, started)


def service_ip(name: str, namespace: str = "imagestream") -> str:
    return kubectl("get", "service", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout


def node_agent_ip() -> str:
    return kubectl("get", "pod", "-n", "imagestream-node", "-l", "app=node-agent",
                   "-o", "jsonpath={.items[0].status.podIP}").stdout


def metrics(port: int) -> dict[str, float]:
    text = in_ns("curl", "-sf", f"http://{node_agent_ip()}:{port}/metrics").stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def content_digests() -> set[str]:
    ctr = [f"{ENV['IMAGESTREAM_CLUSTER_BIN']}/ctrd/ctr", "-a", ENV["CONTAINERD_SOCKET"], "-n", "k8s.io"]
    out = subprocess.run([*ctr, "content", "ls", "-q"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def layer_digest(image_dir) -> str:  # type: ignore[no-untyped-def]
    index = json.loads((image_dir / "index.json").read_text())
    manifest = json.loads((image_dir / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return manifest["layers"][0]["digest"]


@pytest.fixture(scope="module")
def pushed(cluster, debian_image):  # type: ignore[no-untyped-def]
    """The Debian + python3 image in the cluster's regional store (streamable), and in the registry (normal)."""
    env = {"IMAGESTREAM_REGION": f"{service_ip('chunk-store')}:50061"}
    push = in_ns("env", *[f"{k}={v}" for k, v in env.items()], str(ROOT / ".venv/bin/imagestream"), "push", "--quiet",
                 str(debian_image), STREAMED, timeout=900)
    assert "manifest sha256:" in push.stdout, push.stdout + push.stderr
    store = ENV["IMAGESTREAM_CLUSTER_STORAGE"]
    buildah = ["buildah", "--root", f"{store}/storage", "--runroot", f"{store}/run", "--storage-driver", "overlay"]
    image_id = subprocess.run([*buildah, "pull", "--quiet", f"oci:{debian_image.name}"], cwd=debian_image.parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    normal = f"{ENV['REGISTRY']}/bench/debian-python:normal"
    in_ns(*buildah, "push", "--quiet", "--tls-verify=false", image_id, f"docker://{normal}")
    return {"streamed": f"{ENV['STREAM_REGISTRY']}/{STREAMED}", "normal": normal, "layer": layer_digest(debian_image)}


def test_every_tier_is_ready(cluster) -> None:  # type: ignore[no-untyped-def]
    pods = {}
    for namespace in NAMESPACES:
        for pod in json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]:
            ready = [c["ready"] for c in pod["status"].get("containerStatuses", [])]
            pods[pod["metadata"]["labels"]["app"]] = bool(ready) and all(ready)
    assert pods == dict.fromkeys(["cassandra", "chunk-store", "redis", "zonal-cache", "zipkin", "node-agent"], True)
    snapshotter = json.loads(kubectl("get", "pods", "-n", "imagestream-node", "-o", "json").stdout)["items"][0]
    containers = {c["name"]: c["image"] for c in snapshotter["spec"]["containers"]}
    assert containers["snapshotter"] == f"{ENV['REGISTRY']}/imagestream/snapshotter:dev"  # the image built here


def test_pod_start_streamed_vs_pulled_normally(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    """Cold node both ways: kubectl apply -> the pod's first output."""
    assert pushed["layer"] not in content_digests()
    before = metrics(9463)
    streamed_s, out = run_pod("streamed", pushed["streamed"], streamed=True)
    assert json.loads(out) == EXPECTED
    assert pushed["layer"] not in content_digests(), "the streamed image's layer blob was fetched"
    normal_s, out = run_pod("normal", pushed["normal"], streamed=False)
    assert json.loads(out) == EXPECTED
    ratio = streamed_s / normal_s
    cluster["pod-start-streamed"], cluster["pod-start-normal"] = round(streamed_s, 2), round(normal_s, 2)
    print(f"pod start (apply -> first output): streamed {streamed_s:.2f} s, normal pull {normal_s:.2f} s, ratio {ratio:.2f}")
    (CACHE / "cluster" / "pod-start.json").write_text(json.dumps(
        {"streamed_s": round(streamed_s, 2), "normal_s": round(normal_s, 2), "ratio": round(ratio, 2)}))
    after = metrics(9463)
    blocking = 'imagestream_node_upstream_fetches_total{kind="blocking"}'
    assert after.get(blocking, 0) > before.get(blocking, 0), "read on demand while it started"
    assert streamed_s < normal_s


def test_snapshotter_streamed_the_layer_for_the_containers(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    _, out = run_pod("streamed-check", pushed["streamed"], streamed=True)
    assert json.loads(out) == EXPECTED
    snapshotter = metrics(9464)
    assert snapshotter["imagestream_snapshotter_streamed_layers_total"] >= 1
    assert snapshotter["imagestream_snapshotter_streamed_snapshots_total"] >= 1
    assert snapshotter["imagestream_snapshotter_materialized_layers_total"] == 0


def test_image_streaming_event_is_on_the_pod(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    run_pod("streamed-event", pushed["streamed"], streamed=True)
    deadline = time.monotonic() + 30
    while True:
        events = json.loads(kubectl("get", "events", "-n", "default", "--field-selector",
                                    "involvedObject.name=streamed-event,reason=ImageStreaming", "-o", "json").stdout)["items"]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert events, "no ImageStreaming event on the pod"
    uid = kubectl("get", "pod", "streamed-event", "-o", "jsonpath={.metadata.uid}").stdout
    involved = events[0]["involvedObject"]
    assert (involved["kind"], involved["name"], involved["namespace"], involved["uid"]) == ("Pod", "streamed-event", "default", uid)
    assert STREAMED in events[0]["message"]


def test_no_pod_loses_its_root_when_the_snapshotter_restarts(cluster, pushed) -> None:  # type: ignore[no-untyped-def]
    loop = "import time, sqlite3\nwhile True:\n    print(sqlite3.sqlite_version, flush=True)\n    time.sleep(1)\n"
    run_pod("long-running", pushed["streamed"], streamed=True, command=["python3", "-c", loop])
    agent = kubectl("get", "pod", "-n", "imagestream-node", "-l", "app=node-agent", "-o", "jsonpath={.items[0].metadata.name}").stdout
    restarts = lambda: json.loads(kubectl("get", "pod", "-n", "imagestream-node", agent, "-o", "json").stdout)[  # noqa: E731
        "status"]["containerStatuses"]
    before = {c["name"]: c["restartCount"] for c in restarts()}
    kubectl("exec", "-n", "imagestream-node", agent, "-c", "snapshotter", "--", "kill", "1")
    kubectl("wait", "-n", "imagestream-node", f"pod/{agent}", "--for=condition=Ready", "--timeout=180s", timeout=200)
    after = {c["name"]: c["restartCount"] for c in restarts()}
    assert after["snapshotter"] == before["snapshotter"] + 1
    # a new process in the running pod still reads its image: files it never read before, too
    result = kubectl("exec", "long-running", "--", "python3", "-c", "import email.parser, http.client; print('alive')",
                     check=False)
    assert result.stdout.strip() == "alive", result.stderr
    assert kubectl("get", "pod", "long-running", "-o", "jsonpath={.status.phase}").stdout == "Running"


def test_multi_zone_overlay_is_valid_for_the_api_server(cluster) -> None:  # type: ignore[no-untyped-def]
    result = kubectl("apply", "-k", str(ROOT / "k8s" / "overlays" / "multi-zone"), "--dry-run=server", check=False)
    assert result.returncode == 0, result.stderr
    assert "daemonset.apps/node-agent" in result.stdout and "statefulset.apps/cassandra" in result.stdout
