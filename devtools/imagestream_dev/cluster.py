"""The repository's local one-node Kubernetes cluster (scripts/cluster), as the cluster tests and the pod-start
benchmark drive it: its settings, kubectl in its network namespace, imagestream deployed on it (the dev
overlay with the images built here), an image pushed both ways, and a pod timed from `kubectl apply` to its
first line of output."""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "cluster"
CACHE = pathlib.Path(os.environ.get("IMAGESTREAM_CACHE_DIR", ROOT / ".cache"))
NAMESPACES = ("imagestream", "imagestream-node")
IMAGES = ("chunk-store", "zonal-cache", "node-agent", "snapshotter")
# the node agent's disk cache on the node: its IMAGESTREAM_HOME (k8s/base/node/node-agent.yaml) + node-cache
NODE_DISK_CACHE = pathlib.Path("/var/lib/imagestream/node-cache")


def cluster_env() -> dict[str, str]:
    """The variables of scripts/cluster/env, as the scripts see them."""
    out = subprocess.run(["bash", "-c", f". {SCRIPTS / 'env'} && env -0"], capture_output=True, check=True,
                         env={**os.environ, "IMAGESTREAM_CACHE_DIR": str(CACHE)}).stdout
    return dict(line.split("=", 1) for line in out.decode().split("\0") if "=" in line)


ENV = cluster_env()
RUN = pathlib.Path(ENV["IMAGESTREAM_CLUSTER_RUN"])
TLS = RUN / "tls"  # the cluster's CA and the certificates in its TLS Secrets (`secrets`)


def in_ns(*argv: str, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """A command in the cluster's network namespace (its API server and registry are on its loopback)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{ENV['NS']}", *argv], capture_output=True, text=True,
                          check=check, timeout=timeout, input=input, env=ENV)


def kubectl(*args: str, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    result = in_ns("kubectl", *args, check=False, timeout=timeout, input=input)
    if check and result.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: rc {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def timed(phase: str, timings: dict[str, float], argv: list[str], timeout: float) -> None:
    """Run a step of the set-up, keep and print its wall time; a failure shows the end of its output."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)
    timings[phase] = round(time.monotonic() - started, 1)
    print(f"phase {phase}: {timings[phase]} s\n{result.stdout}", flush=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def image_digest(registry: str, target: str) -> str:
    """The digest of the manifest the registry holds as imagestream/TARGET:dev (what scripts/cluster/images pushed)."""
    head = in_ns("curl", "-sfI", "-H", "Accept: application/vnd.oci.image.manifest.v1+json, "
                 "application/vnd.docker.distribution.manifest.v2+json",
                 f"http://{registry}/v2/imagestream/{target}/manifests/dev").stdout
    m = re.search(r"^docker-content-digest:\s*(sha256:[0-9a-f]{64})", head, flags=re.M | re.I)
    if not m:
        raise RuntimeError(f"the registry {registry} has no imagestream/{target}:dev: {head!r}")
    return m.group(1)


def dev_overlay(registry: str) -> pathlib.Path:
    """The dev overlay with the images built here, as `kustomize edit set image` would name them: by digest, so
    that a node holding an older build under the same tag runs the new one, and a new build rolls out."""
    folder = RUN / "deploy"
    folder.mkdir(parents=True, exist_ok=True)
    overlay = os.path.relpath(ROOT / "k8s" / "overlays" / "dev", folder)
    images = "".join(f"  - {{name: {t}, newName: {registry}/imagestream/{t}, digest: {image_digest(registry, t)}}}\n"
                     for t in IMAGES)
    (folder / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {overlay}\nimages:\n{images}")
    return folder


def secrets(log: Callable[[str], None] = lambda _: None) -> None:
    """The Secrets the manifests mount, made once: the backends' passwords (scripts/k8s-secrets, as a user runs
    it) and the TLS Secrets of k8s/cert-manager's Certificates. cert-manager's images are out of reach here, so
    these are issued from a CA of the cluster's own (kept in TLS) with each Certificate's names, addresses
    and roles, into the Secret it names: what cert-manager would write (tls.crt, tls.key, ca.crt). The node's
    containerd presents `node.crt` to the chunk store's Distribution endpoint (scripts/cluster/up)."""
    import yaml

    from imagestream import tls
    from imagestream_dev.stack import certs

    in_ns("sh", str(ROOT / "scripts" / "k8s-secrets"), "imagestream")
    kubectl("apply", "-f", str(ROOT / "k8s" / "base" / "namespaces.yaml"))
    ca = certs.load_ca(TLS) if (TLS / "ca.key").exists() else certs.make_ca(TLS, "imagestream cluster CA")
    if not (TLS / "node.key").exists():
        certs.issue(ca, TLS, "node", ("node",), hosts=())
    wanted = [d for d in yaml.safe_load_all((ROOT / "k8s" / "cert-manager" / "certificates.yaml").read_text())
              if d and d.get("kind") == "Certificate"]
    for cert in wanted:
        spec, namespace = cert["spec"], cert["metadata"]["namespace"]
        name = spec["secretName"]
        if kubectl("get", "secret", "-n", namespace, name, check=False).returncode == 0:
            continue
        roles = [u.removeprefix(tls.ROLE_URI) for u in spec.get("uris", []) if u.startswith(tls.ROLE_URI)]
        certs.issue(ca, TLS, name, roles, hosts=[*spec.get("dnsNames", []), *spec.get("ipAddresses", [])])
        kubectl("create", "secret", "generic", name, "-n", namespace, f"--from-file=tls.crt={TLS / (name + '.crt')}",
                f"--from-file=tls.key={TLS / (name + '.key')}", f"--from-file=ca.crt={TLS / 'ca.crt'}")
        log(f"secret {namespace}/{name}: issued (roles {', '.join(roles) or 'none'})")


def rolled_out(timeout_s: int = 900) -> None:
    """Wait for every workload of imagestream's namespaces: Cassandra, chunk store, Redis, zonal cache, Zipkin, node agent."""
    for namespace in NAMESPACES:
        for kind in ("statefulset", "deployment", "daemonset"):
            for name in kubectl("get", kind, "-n", namespace, "-o", "name").stdout.split():
                kubectl("rollout", "status", "-n", namespace, name, f"--timeout={timeout_s}s", timeout=timeout_s + 60)


def deploy(timings: dict[str, float]) -> None:
    """Start the cluster (built once), build and push the images, apply the dev overlay and wait until it is Ready."""
    timed("build-binaries", timings, [str(SCRIPTS / "build")], 3600)
    timed("cluster-up", timings, [str(SCRIPTS / "up")], 600)
    registry = ENV["REGISTRY"]
    # built on this machine's network (PyPI, Debian), pushed from the cluster's namespace
    push = ["--netns", ENV["NS"], "--push", registry]
    timed("build-images", timings, [str(SCRIPTS / "images"), *push], 3600)
    timed("build-third-party-images", timings, [str(SCRIPTS / "images"), "--third-party", *push], 3600)
    started = time.monotonic()
    secrets()
    # a Job's pod is immutable: the schema step of an earlier build is replaced (it is idempotent)
    kubectl("delete", "job", "-n", "imagestream", "chunk-store-schema", "--ignore-not-found", "--wait=true")
    kubectl("apply", "-k", str(dev_overlay(registry)))
    rolled_out()
    timings["deploy-ready"] = round(time.monotonic() - started, 1)
    print(f"phase deploy-ready: {timings['deploy-ready']} s", flush=True)


def service_ip(name: str, namespace: str = "imagestream") -> str:
    return kubectl("get", "service", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout


def buildah(*args: str) -> list[str]:
    store = ENV["IMAGESTREAM_CLUSTER_STORAGE"]
    return ["buildah", "--root", f"{store}/storage", "--runroot", f"{store}/run", "--storage-driver", "overlay", *args]


FORWARD_PORT = 26051  # the chunk store's gRPC port forwarded on the node's loopback (the cluster's port range)


@contextlib.contextmanager
def chunk_store_forwarded() -> Iterator[str]:
    """The chunk store's gRPC API on 127.0.0.1 through `kubectl port-forward`, as an operator reaches it (its
    certificate names 127.0.0.1 for this; the Tilt loop's smoke test does the same)."""
    forward = subprocess.Popen(["nsenter", f"--net=/run/netns/{ENV['NS']}", "kubectl", "port-forward", "-n", "imagestream",
                                "service/chunk-store", f"{FORWARD_PORT}:50061"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        assert forward.stdout is not None
        first = forward.stdout.readline()
        if "Forwarding from" not in first:
            raise RuntimeError(f"kubectl port-forward of the chunk store: {first.strip()} (rc {forward.poll()})")
        yield f"127.0.0.1:{FORWARD_PORT}"
    finally:
        forward.terminate()
        forward.wait(10)


def pusher_tls() -> list[str]:
    """IMAGESTREAM_TLS_* assignments for the operators' certificate, read from the Secret pusher-tls."""
    folder = TLS / "pusher"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.loads(kubectl("get", "secret", "-n", "imagestream", "pusher-tls", "-o", "jsonpath={.data}").stdout)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (folder / key).write_bytes(base64.b64decode(data[key]))
    (folder / "tls.key").chmod(0o600)
    return [f"IMAGESTREAM_TLS_CERT={folder / 'tls.crt'}", f"IMAGESTREAM_TLS_KEY={folder / 'tls.key'}",
            f"IMAGESTREAM_TLS_CA={folder / 'ca.crt'}"]


def layer_and_chain_id(image_dir: pathlib.Path) -> tuple[str, str, str]:
    """The digest of an OCI layout's one layer blob, its snapshot's name (a first layer's chain ID is its diff ID),
    and the digest of its config (the image's id)."""
    def blob(digest: str) -> dict:
        return json.loads((image_dir / "blobs" / "sha256" / digest.split(":")[1]).read_text())

    manifest = blob(json.loads((image_dir / "index.json").read_text())["manifests"][0]["digest"])
    config = manifest["config"]["digest"]
    return manifest["layers"][0]["digest"], blob(config)["rootfs"]["diff_ids"][0], config


def push_both_ways(image: pathlib.Path, name: str) -> dict[str, str]:
    """An OCI layout pushed to the cluster's regional store (streamed) and to its registry (pulled normally).

    Returns the references a pod names, {"streamed": ..., "normal": ...}, the layer blob's digest in each
    ("layer": the layout's, which the streamed image names; "normal_layer": the registry's copy, as buildah
    pushed it), the layer's snapshot name ("chain_id", the same both ways) and the image's config ("config")."""
    cli = str(ROOT / ".venv" / "bin" / "imagestream")
    with chunk_store_forwarded() as region:
        result = in_ns("env", *pusher_tls(), f"IMAGESTREAM_REGION={region}", cli, "push", "--quiet", str(image), name,
                       timeout=900, check=False)
    if "manifest sha256:" not in result.stdout:
        raise RuntimeError(f"imagestream push: rc {result.returncode}\n{result.stdout}\n{result.stderr}")
    image_id = subprocess.run(buildah("pull", "--quiet", f"oci:{image.name}"), cwd=image.parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    repository, _, tag = name.partition(":")
    normal = f"{ENV['REGISTRY']}/{repository}:{tag or 'latest'}-normal"
    in_ns(*buildah("push", "--quiet", "--tls-verify=false", image_id, f"docker://{normal}"))
    manifest = json.loads(in_ns("curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json, "
                                "application/vnd.docker.distribution.manifest.v2+json",
                                f"http://{ENV['REGISTRY']}/v2/{repository}/manifests/{tag or 'latest'}-normal").stdout)
    layer, chain_id, config = layer_and_chain_id(image)
    return {"streamed": f"{ENV['STREAM_REGISTRY']}/{name}", "normal": normal, "layer": layer,
            "normal_layer": manifest["layers"][0]["digest"], "chain_id": chain_id, "config": config}


def pod_yaml(name: str, image: str, command: list[str], streamed: bool) -> str:
    runtime = "  runtimeClassName: imagestream\n" if streamed else ""
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{runtime}"
            f"  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n"
            f"    - name: app\n      image: {image}\n      imagePullPolicy: IfNotPresent\n"
            f"      command: {json.dumps(command)}\n")


def first_output(name: str, uid: str, started: float, timeout: float = 600) -> tuple[float, str]:
    """Seconds from `started` until the pod's container wrote its first line (its log file on the node)."""
    pattern = f"{RUN}/pod-logs/default_{name}_{uid}/app/*.log"
    deadline = started + timeout
    while time.monotonic() < deadline:
        for path in glob.glob(pattern):
            with open(path) as f:
                line = f.readline()
            if line.endswith("\n"):
                return time.monotonic() - started, line.split(" ", 3)[3].strip()  # CRI log: time stream tag message
        time.sleep(0.02)
    status = kubectl("get", "pod", name, "-o", "jsonpath={.status}", check=False).stdout
    raise RuntimeError(f"pod {name} wrote nothing in {timeout} s: {status}")


def run_pod(name: str, image: str, streamed: bool, command: list[str]) -> tuple[float, str]:
    """(seconds from `kubectl apply` to the first line of output, that line) of a new pod."""
    delete_pods(name)
    started = time.monotonic()
    uid = kubectl("apply", "-f", "-", "-o", "jsonpath={.metadata.uid}", input=pod_yaml(name, image, command, streamed)).stdout
    return first_output(name, uid, started)


def ctr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([f"{ENV['IMAGESTREAM_CLUSTER_BIN']}/ctrd/ctr", "-a", ENV["CONTAINERD_SOCKET"], "-n", "k8s.io", *args],
                          capture_output=True, text=True, check=True)


def content_digests() -> set[str]:
    """The blobs in the node's containerd content store."""
    return set(ctr("content", "ls", "-q").stdout.split())


def delete_pods(*names: str) -> None:
    """The pods deleted, and their containers with them. The kubelet removes a deleted pod's containers only at
    its next container collection (once a minute), and until then each keeps its root's snapshot and so the
    image's layer snapshot under it: a pull then finds the layer unpacked (or committed) and fetches nothing."""
    for name in names:
        kubectl("delete", "pod", name, "--ignore-not-found", "--wait=true")
        # one filter, its conditions joined by commas (AND); filters given apart are ORed
        ids = ctr("containers", "ls", "-q", f'labels."io.kubernetes.pod.name"=={name},'
                  'labels."io.cri-containerd.kind"==container').stdout.split()
        if ids:
            ctr("containers", "rm", *ids)


def forget_image(*references: str, config: str = "") -> None:
    """The node no longer has these images: every name of them (the CRI adds `repo@digest` and the image id)
    removed, and their content and snapshots collected at once. With `config` (an image's config digest), also
    every other image of that config (the same image pushed under other names: its layers are the same
    snapshots, which a pull would find)."""
    rows = [line.split() for line in ctr("images", "ls").stdout.splitlines()[1:]]
    digests = {row[2] for row in rows if row[0] in references}
    if config:
        for row in rows:
            try:
                manifest = json.loads(ctr("content", "get", row[2]).stdout)
            except (subprocess.CalledProcessError, json.JSONDecodeError):
                continue
            if manifest.get("config", {}).get("digest") == config:
                digests.add(row[2])
    names = [row[0] for row in rows if row[2] in digests]
    if names:
        ctr("images", "rm", "--sync", *names)


def node_agent_pod() -> str:
    return kubectl("get", "pod", "-n", "imagestream-node", "-l", "app=node-agent",
                   "-o", "jsonpath={.items[0].metadata.name}").stdout


def cold_node(log: Callable[[str], None] = lambda _: None) -> None:
    """Empty the node's caches and the zone's, keeping the regional store: a node that never read the image.

    The node agent's pod is replaced (its memory cache and FUSE client go) with its disk cache removed from
    the node in between; Redis is flushed and the zonal cache's pod replaced. No streamed pod may be running."""
    old = node_agent_pod()
    kubectl("delete", "pod", "-n", "imagestream-node", old, "--wait=true", timeout=200)
    # moved aside first: the DaemonSet's new pod may already be starting, and its node cache making the folder
    # again, while the old one is removed (an `rm -rf` in place then fails on files appearing under it)
    gone = NODE_DISK_CACHE.with_name(f"{NODE_DISK_CACHE.name}.cold-{time.monotonic_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(NODE_DISK_CACHE, gone)
    shutil.rmtree(gone, ignore_errors=True)
    redis = kubectl("get", "pod", "-n", "imagestream", "-l", "app=redis", "-o", "jsonpath={.items[0].metadata.name}").stdout
    kubectl("exec", "-n", "imagestream", redis, "--", "redis-cli", "FLUSHALL")
    kubectl("delete", "pod", "-n", "imagestream", "-l", "app=zonal-cache", "--wait=true", timeout=200)
    rolled_out(300)
    log(f"cold node: node agent {old} replaced, disk cache {NODE_DISK_CACHE} removed, Redis flushed, zonal cache replaced")


def metrics(port: int) -> dict[str, float]:
    """The node agent's Prometheus metrics (node cache 9463, snapshotter 9464), read over the pod network."""
    ip = kubectl("get", "pod", "-n", "imagestream-node", "-l", "app=node-agent", "-o", "jsonpath={.items[0].status.podIP}").stdout
    text = in_ns("curl", "-sf", f"http://{ip}:{port}/metrics").stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def zipkin() -> str:
    """The Zipkin server's base URL, from the cluster's namespace."""
    return f"http://{service_ip('zipkin')}:9411"


def cold_start_trace(since_ms: int,
                     services: tuple[str, ...] = ("fuse-client", "node-cache", "zonal-cache", "chunk-store")) -> dict:
    """The trace begun after `since_ms` (epoch ms) with the most spans among those that cross every one of
    `services`: a read of the pod's image missed by the node, followed down the tiers (each FUSE read that
    goes upstream is a trace of its own). Returns {"id": ..., "services": [...], "spans": n}."""
    lookback = max(60_000, int(time.time() * 1000) - since_ms + 60_000)
    found = json.loads(in_ns("curl", "-sf", f"{zipkin()}/api/v2/traces?serviceName={services[0]}&limit=2000"
                                             f"&lookback={lookback}").stdout)
    best: dict = {}
    for trace in found:
        names = sorted({s.get("localEndpoint", {}).get("serviceName", "") for s in trace} - {""})
        if min(s.get("timestamp", 0) for s in trace) // 1000 < since_ms or not set(services) <= set(names):
            continue
        if len(trace) > best.get("spans", 0):
            best = {"id": trace[0]["traceId"], "services": names, "spans": len(trace)}
    if not best:
        raise RuntimeError(f"no trace since {since_ms} crosses {', '.join(services)} ({len(found)} traces of {services[0]})")
    return best


def screenshot_trace(trace_id: str, out: pathlib.Path) -> None:
    """A PNG of Zipkin's page for the trace, by headless Chromium (Debian's chromium) in the cluster's namespace."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise RuntimeError("the trace screenshot needs Chromium: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        in_ns(browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
              "--window-size=1600,1000", "--virtual-time-budget=60000", f"--screenshot={out}",
              f"{zipkin()}/zipkin/traces/{trace_id}", timeout=180)
    if not out.exists() or out.stat().st_size < 10_000:
        raise RuntimeError(f"chromium wrote no screenshot of trace {trace_id} to {out}")
