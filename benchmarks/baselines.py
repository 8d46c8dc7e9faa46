"""Baselines: what users would run instead of imagestream, in the same run, through the same emulated link.

Every path starts the same image (the Debian + python3 image) cold and runs the same python program
(`setup.PROGRAM`), timed from the start of the pull to the program's first line of output:

* `containerd`: containerd 2.2.9 + runc 1.5.3 pull the original image (one gzip layer) from a CNCF
  distribution registry (v3.1.2), unpack it into overlayfs, then `ctr run`;
* `estargz`, `estargz_opt`: the stargz snapshotter (stargz-snapshotter v0.19.1 library, served by
  `peerctl stargz-grpc`) lazily pulls the image converted to eStargz (`peerctl convert`, byte-identical
  to `ctr-remote image convert --estargz`), and the same optimized by `ctr-remote image optimize` with
  the program as its workload (prefetch landmark);
* `nydus`: nydus-snapshotter v0.16.1 + nydusd 2.2.0 (FUSE) lazily pull the image converted to RAFS v6;
* `soci`: soci-snapshotter v0.16.1 lazily pulls the original image with its SOCI index v2;
* imagestream: through containerd (CRI pull, then `ctr run --snapshotter imagestream`) and through
  `imagestream run`, each cold without a profile (the image's first start anywhere) and with the startup
  profile (every later one: the image pushed a second time under a name with a recorded profile); and its
  fallback pull
  (IMAGESTREAM_STREAMING=off: every chunk through the node cache, the tree written to disk, then run),
  kept as its own row.

Each peer run gets a fresh containerd (own root, state and socket) and a fresh snapshotter with an
empty root and cache. The registry sits behind `Link.forward`: the same veth, tbf and delaying proxy as
imagestream's regional store, so every path crosses the same bandwidth and round-trip time. The peers'
images are converted and pushed once per benchmark run. Registry GETs (manifests and blobs) per cold
start come from the registry's access log; imagestream's dependent round trips are its blocking chunk
fetches.

Fan-out: N cold nodes (N containerd instances with their own snapshotters, or N imagestream node
caches behind one zonal cache) start the image at once over the one link.

Binaries come from `scripts/peers/build` (.cache/peers/bin); a path whose binaries are missing is
skipped and the results say why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

from benchmarks.harness import CACHE, end_under, fresh_snapshotter, stop_group
from benchmarks.setup import Image, Setup, log
from snapshotter.containerd_local import config_head_v3

NO_CRI = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
          "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim")

BIN = CACHE / "peers" / "bin"
REPO = "bench/peers"  # repository of the peers' images in the registry


@dataclasses.dataclass(frozen=True)
class Peer:
    key: str
    tag: str  # the image's tag in the registry
    snapshotter: str  # containerd snapshotter ("overlayfs": the default, a full pull)
    label: str
    needs: tuple[str, ...]  # binaries in BIN


PEERS = (
    Peer("containerd", "orig", "overlayfs", "containerd 2.2.9 + runc: pull (gzip layer), then `ctr run`",
         ("registry", "ctrd/containerd", "runc")),
    Peer("estargz", "esgz", "stargz", "stargz snapshotter, eStargz", ("registry", "ctrd/containerd", "runc", "peerctl")),
    Peer("estargz_opt", "esgz-opt", "stargz", "stargz snapshotter, optimized eStargz (`ctr-remote image optimize`)",
         ("registry", "ctrd/containerd", "runc", "peerctl", "ctr-remote")),
    Peer("nydus", "nydus", "nydus", "Nydus (RAFS v6, nydusd FUSE)",
         ("registry", "ctrd/containerd", "runc", "peerctl", "nydus-image", "nydusd", "containerd-nydus-grpc")),
    Peer("soci", "soci", "soci", "SOCI (index v2)",
         ("registry", "ctrd/containerd", "runc", "peerctl", "soci", "soci-snapshotter-grpc")),
)
LAZY = tuple(p.key for p in PEERS if p.snapshotter != "overlayfs")
IMAGESTREAM = {
    "imagestream_containerd": "imagestream: CRI pull, then `ctr run` (snapshotter)",
    "imagestream_containerd_profile": "imagestream: CRI pull, then `ctr run` (snapshotter), with startup profile",
    "imagestream_run": "imagestream: `imagestream run`, cold",
    "imagestream_profile": "imagestream: `imagestream run`, cold, with startup profile",
    "imagestream_fallback": "imagestream fallback pull (IMAGESTREAM_STREAMING=off), then run",
}
LABELS = {**{p.key: p.label for p in PEERS}, **IMAGESTREAM}


def missing(peer: Peer) -> list[str]:
    return [b for b in peer.needs if not os.access(BIN / b, os.X_OK)]


def _run(*args: str, timeout: float = 600, env: dict | None = None) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{pathlib.Path(args[0]).name} {' '.join(args[1:4])} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout)[-1500:]}")
    return result.stdout


def _wait(what: str, ready, proc: subprocess.Popen | None, log_file: pathlib.Path, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not ready():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            raise RuntimeError(f"{what} did not start; {log_file}:\n{tail}")
        time.sleep(0.1)


# -- the registry -------------------------------------------------------------------

class Registry:
    """A CNCF distribution registry with a filesystem store in `folder`, on 127.0.0.1:port."""

    def __init__(self, folder: pathlib.Path, port: int) -> None:
        self.folder = folder
        self.address = f"127.0.0.1:{port}"
        self.log = folder / "registry.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "config.yml"
        conf.write_text(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                        f"storage:\n  filesystem:\n    rootdirectory: {self.folder / 'store'}\n  delete:\n    enabled: true\n"
                        f"http:\n  addr: {self.address}\n  secret: imagestream-bench\n"
                        f"health:\n  storagedriver:\n    enabled: false\n")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(BIN / "registry"), "serve", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait("registry", up, self.proc, self.log)

    def offset(self) -> int:
        return self.log.stat().st_size

    def gets_since(self, offset: int) -> dict:
        """Requests the registry served since `offset` of its log: GETs (manifests, blobs) and blob bytes."""
        gets = blobs = size = 0
        with open(self.log, "rb") as f:
            f.seek(offset)
            for line in f:
                m = re.search(rb'"(GET|HEAD) /v2/[^ ]*/(blobs|manifests)/[^ ]* HTTP/[0-9.]+" (\d+) (\d+)', line)
                if m and m.group(1) == b"GET":
                    gets += 1
                    if m.group(2) == b"blobs":
                        blobs += 1
                        size += int(m.group(4))
        return {"gets": gets, "blob_gets": blobs, "blob_bytes": size}

    def close(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout_s=20)


# -- a node: containerd 2.2.9 with one snapshotter ------------------------------------

# the head (containerd_local.config_head_v3, CRI off: the peers' nodes are driven by ctr), then:
CONTAINERD_CONFIG = """\
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "{d}/stargz.sock"
  [proxy_plugins.nydus]
    type = "snapshot"
    address = "{d}/nydus.sock"
  [proxy_plugins.soci]
    type = "snapshot"
    address = "{d}/soci.sock"
"""

# As the peers document them for a plain-HTTP registry; nothing tuned.
STARGZ_CONFIG = """\
[[resolver.host."{host}".mirrors]]
  host = "{host}"
  insecure = true
"""
SOCI_CONFIG = """\
[content_store]
  type = "containerd"
  containerd_address = "{d}/containerd.sock"

[pull_modes]
  [pull_modes.soci_v1]
    enable = false
  [pull_modes.soci_v2]
    enable = true

[resolver.host."{host}"]
  [[resolver.host."{host}".mirrors]]
    host = "http://{host}"
    insecure = true
"""
NYDUS_CONFIG = """\
version = 1
root = "{d}/nydus"
address = "{d}/nydus.sock"
daemon_mode = "dedicated"
cleanup_on_close = true

[system]
enable = false

[daemon]
nydusd_config = "{d}/nydusd.json"
nydusd_path = "{d}/nydusd-wrap"
nydusimage_path = "{bin}/nydus-image"
fs_driver = "fusedev"
recover_policy = "restart"
threads_number = 0

[cgroup]
enable = false

[log]
log_to_stdout = true
level = "info"

[metrics]
address = ""

[remote]
convert_vpc_registry = false

[snapshot]
enable_nydus_overlayfs = false
sync_remove = true

[cache_manager]
disable = false
gc_period = "24h"
cache_dir = "{d}/nydus-cache"
"""
NYDUSD_CONFIG = """\
{"device": {"backend": {"type": "registry", "config": {"scheme": "http", "timeout": 10, "connect_timeout": 10,
 "retry_limit": 2}}, "cache": {"type": "blobcache"}},
 "mode": "direct", "digest_validate": false, "iostats_files": false, "enable_xattr": true, "amplify_io": 1048576,
 "fs_prefetch": {"enable": false}}
"""
# nydus-snapshotter v0.16.1 runs `nydusd fuse ...`, a subcommand nydusd 2.2.0 does not have; and nydusd's default
# open-files limit (1000000) needs CAP_SYS_RESOURCE. The wrapper drops the one and asks for the current limit.
NYDUSD_WRAP = """#!/bin/sh
[ "$1" = fuse ] && shift
exec "{bin}/nydusd" "$@" --rlimit-nofile 0
"""


class Node:
    """A cold node of the peers: a fresh containerd 2.2.9 in `folder` and, for a lazy path, its snapshotter."""

    def __init__(self, folder: pathlib.Path, snapshotter: str, registry: str) -> None:
        self.dir = folder
        self.snapshotter = snapshotter
        self.registry = registry  # host:port the node pulls from (the link's address)
        self.socket = str(folder / "containerd.sock")
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.dir / f"{name}.log", "ab") as out:
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def start(self) -> None:
        d, host = self.dir, self.registry
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for sub in ("root", "state", "opt"):
            (d / sub).mkdir()
        sn = self.snapshotter
        if sn == "stargz":
            (d / "stargz.toml").write_text(STARGZ_CONFIG.format(host=host))
            p = self._spawn("stargz", [str(BIN / "peerctl"), "stargz-grpc", "-address", f"{d}/stargz.sock",
                                       "-root", f"{d}/stargz", "-config", f"{d}/stargz.toml", "-log-level", "info"])
        elif sn == "soci":
            (d / "soci.toml").write_text(SOCI_CONFIG.format(d=d, host=host))
            p = self._spawn("soci", [str(BIN / "soci-snapshotter-grpc"), "--address", f"{d}/soci.sock",
                                     "--config", f"{d}/soci.toml", "--root", f"{d}/soci", "--log-level", "info"])
        elif sn == "nydus":
            (d / "nydus-snapshotter.toml").write_text(NYDUS_CONFIG.format(d=d, bin=BIN))
            (d / "nydusd.json").write_text(NYDUSD_CONFIG)
            (d / "nydusd-wrap").write_text(NYDUSD_WRAP.format(bin=BIN))
            (d / "nydusd-wrap").chmod(0o755)
            p = self._spawn("nydus", [str(BIN / "containerd-nydus-grpc"), "--config", f"{d}/nydus-snapshotter.toml",
                                      "--log-to-stdout"])
        else:
            p = None
        if p is not None:
            sock = d / f"{sn}.sock"
            _wait(f"{sn} snapshotter", sock.exists, p, d / f"{sn}.log")
        (d / "config.toml").write_text(config_head_v3(d, NO_CRI) + CONTAINERD_CONFIG.format(d=d))
        env = {**os.environ, "PATH": os.pathsep.join([str(BIN / "ctrd"), str(BIN), os.environ.get("PATH", "")])}
        ctrd = self._spawn("containerd", [str(BIN / "ctrd" / "containerd"), "--config", str(d / "config.toml")], env=env)
        _wait("containerd", lambda: self.ctr("version", check=False).returncode == 0, ctrd, d / "containerd.log")
        if p is not None:  # containerd reaches a proxy snapshotter over gRPC with backoff: wait until it does
            _wait(f"{sn} snapshotter in containerd",
                  lambda: self.ctr("snapshots", "--snapshotter", sn, "ls", check=False).returncode == 0,
                  ctrd, d / "containerd.log")

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "ctrd" / "ctr"), "--address", self.socket, *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args[:3])} exited {result.returncode}: {result.stderr[-1500:]}")
        return result

    def pull(self, ref: str) -> None:
        if self.snapshotter == "overlayfs":
            self.ctr("images", "pull", "--plain-http", ref)
        else:  # the labels a remote snapshotter needs to mount the layers lazily (what `ctr-remote image rpull` does)
            _run(str(BIN / "peerctl"), "rpull", "-a", self.socket, "-plain-http", "-snapshotter", self.snapshotter, ref)

    def run_first_output(self, ref: str, name: str, image: Image, timeout_s: float = 600) -> float:
        """`ctr run` the image's command; perf_counter() when its first line came (the caller holds the start time)."""
        proc = subprocess.Popen([str(BIN / "ctrd" / "ctr"), "--address", self.socket, "run", "--rm",
                                 "--snapshotter", self.snapshotter, ref, name, *image.command],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else b""
            at = time.perf_counter()
            code = proc.wait(timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if line.decode(errors="replace").strip() != image.expect or code != 0:
            raise RuntimeError(f"ctr run ({self.snapshotter}) exit {code}, output {line!r}: "
                               f"{proc.stderr.read().decode(errors='replace')[-1500:]}")
        return at

    def close(self) -> None:
        for p in reversed(self.procs):  # containerd first, then its snapshotter
            stop_group(p, timeout_s=15)
        end_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the peers' images -----------------------------------------------------------------

def gzip_archive(source: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """The image as users ship it: its layers gzip-compressed, as an OCI archive (for `ctr images import`)."""
    from imagestream_dev import imagebuild

    index = json.loads((source / "index.json").read_text())
    blobs = source / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    if all(layer["mediaType"].endswith("tar+gzip") for layer in manifest["layers"]):
        layout = workdir / "gzip-layout"  # the same blobs, an index whose manifest names its platform
        (layout / "blobs" / "sha256").mkdir(parents=True)
        for blob in blobs.iterdir():
            (layout / "blobs" / "sha256" / blob.name).symlink_to(blob)
        (layout / "oci-layout").write_text((source / "oci-layout").read_text())
    else:  # the quick mode's tiny image has plain tar layers
        import zstandard

        plain = []
        for i, layer in enumerate(manifest["layers"]):
            path = blobs / layer["digest"].split(":")[1]
            if layer["mediaType"].endswith("tar+zstd"):
                out = workdir / f"layer-{i}.tar"
                with open(path, "rb") as fin, open(out, "wb") as fout:
                    zstandard.ZstdDecompressor().copy_stream(fin, fout)
                path = out
            plain.append(path)
        layout = workdir / "gzip-layout"
        imagebuild.write_oci_layout_from_layers(plain, layout, compression="gzip")
        index = json.loads((layout / "index.json").read_text())
    # SOCI refuses an index whose manifest has no platform ("manifest should have proper platform")
    for m in index["manifests"]:
        m.setdefault("platform", {"architecture": "amd64", "os": "linux"})
    (layout / "index.json").write_text(json.dumps(index))
    return imagebuild.write_oci_archive(layout, workdir / "image-gzip.oci.tar")


def prepare_images(registry: Registry, source: pathlib.Path, workdir: pathlib.Path, peers: list[Peer], repo: str,
                   command: tuple[str, ...]) -> tuple[dict, dict]:
    """Import the gzip image into a builder containerd, convert it for each peer, push every form to `repo`.

    Seconds per step and the gzip image's size (orig_bytes); and {peer: why} for each peer whose image could
    not be made (that peer is skipped, the others run). `command` is the optimized eStargz's workload."""
    archive = gzip_archive(source, workdir)
    seconds: dict[str, float] = {"orig_bytes": archive.stat().st_size}
    failed: dict[str, str] = {}
    builder = Node(workdir / "builder", "overlayfs", registry.address)
    src = f"{registry.address}/{repo}:orig"

    def step(name: str, fn, peer: str = "") -> None:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            fn()
        except RuntimeError as e:
            if not peer:
                raise
            failed[peer] = f"{name} failed: {str(e).splitlines()[0][:300]}"
            log(f"  peers' images: {failed[peer]}")
            return
        seconds[name] = round(time.monotonic() - started, 1)
        log(f"  peers' images ({repo}): {name} [{seconds[name]:.0f} s]")

    entrypoint = command[0] if command[0].startswith("/") else f"/usr/bin/{command[0]}"
    try:
        builder.start()
        step("import", lambda: builder.ctr("images", "import", "--index-name", src, str(archive)))
        keys = {p.key for p in peers}
        a = builder.socket
        if "estargz" in keys:
            step("convert estargz", peer="estargz", fn=lambda: _run(str(BIN / "peerctl"), "convert", "-a", a, "-format", "estargz",
                                                 src, f"{registry.address}/{repo}:esgz", timeout=3600))
        if "estargz_opt" in keys:
            step("optimize estargz", peer="estargz_opt", fn=lambda: _run(
                str(BIN / "ctr-remote"), "-a", a, "image", "optimize", "--oci",
                "--entrypoint", json.dumps([entrypoint]), "--args", json.dumps(list(command[1:])),
                src, f"{registry.address}/{repo}:esgz-opt", timeout=3600,
                env={**os.environ, "PATH": os.pathsep.join([str(BIN / "ctrd"), str(BIN), os.environ["PATH"]])}))
        if "nydus" in keys:
            (workdir / "nydus-work").mkdir(exist_ok=True)
            step("convert nydus", peer="nydus", fn=lambda: _run(str(BIN / "peerctl"), "convert", "-a", a, "-format", "nydus",
                                               "-nydus-image", str(BIN / "nydus-image"), "-work-dir",
                                               str(workdir / "nydus-work"), src, f"{registry.address}/{repo}:nydus",
                                               timeout=3600))
        if "soci" in keys:
            step("convert soci", peer="soci", fn=lambda: _run(str(BIN / "soci"), "--address", a, "--root", str(workdir / "soci-root"),
                                              "convert", src, f"{registry.address}/{repo}:soci", timeout=3600))
        for p in peers:
            if p.key not in failed:
                step(f"push {p.tag}", peer=p.key, fn=lambda p=p: builder.ctr("images", "push", "--plain-http",
                                                                           f"{registry.address}/{repo}:{p.tag}"))
    finally:
        builder.close()
        archive.unlink(missing_ok=True)
    return seconds, failed


# -- measuring -------------------------------------------------------------------------

def cold_start(node_dir: pathlib.Path, peer: Peer, ref: str, registry_host: str, name: str, image: Image) -> dict:
    """One cold start of a peer on a fresh node: pull, run, first output."""
    node = Node(node_dir, peer.snapshotter, registry_host)
    try:
        node.start()
        started = time.perf_counter()
        node.pull(ref)
        pulled = time.perf_counter()
        first = node.run_first_output(ref, name, image)
        return {"seconds": first - started, "pull_s": pulled - started, "run_s": first - pulled}
    finally:
        node.close()


def _at_once(n: int, one) -> list[float]:  # type: ignore[no-untyped-def]
    """one(i) for i < n, each in its own thread, all at once; their results (an exception is raised here)."""
    results: list = [0.0] * n

    def run(i: int) -> None:
        try:
            results[i] = one(i)
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [float(r) for r in results]


def fan_out(workdir: pathlib.Path, peer: Peer, ref: str, registry_host: str, n: int, image: Image) -> list[float]:
    """N fresh nodes pull and run at once; seconds to each one's first output."""
    nodes = [Node(workdir / f"fan-{peer.key}-{i}", peer.snapshotter, registry_host) for i in range(n)]
    try:
        for node in nodes:
            node.start()
        started = time.perf_counter()

        def one(i: int) -> float:
            nodes[i].pull(ref)
            return nodes[i].run_first_output(ref, f"fan{i}", image) - started

        return _at_once(n, one)
    finally:
        for node in nodes:
            node.close()


def _summary(cell: dict) -> dict:
    for key in [k for k in cell if isinstance(cell[k], list) and cell[k] and k != "samples"]:
        cell[f"{key}_median"] = statistics.median(cell[key])
    cell["median"] = statistics.median(cell["samples"])
    return cell


@dataclasses.dataclass
class Cell:
    """One image of the baselines: its imagestream image (pushed, profiled; or `make()` does that when its turn
    comes), the source it was built from, how often."""
    label: str
    source: pathlib.Path
    runs: int
    image: Image | None = None
    make: Callable[[], Image] | None = None
    fallback: bool = True  # the fallback pull row (bounded out for the large image: a full pull through every tier)


def measure(setup: Setup, images: list[Cell], port: int, wanted: list[str], fanout_n: int = 0,
            progress=None) -> dict:  # type: ignore[no-untyped-def]
    """The baselines of each image, and the first image's fan-out (measured right after that image):
    {by_image: {label: {path: cell}}, images: {label: {runs, command, orig_bytes, images_prepared_s, skipped}},
    fanout, skipped (paths whose binaries are missing), labels}. `progress(out)` after each step (a long run's
    results survive an interruption)."""
    out: dict = {"labels": LABELS, "skipped": {}, "by_image": {}, "images": {}}
    # Every snapshotter this run starts (the stack's, made fresh per run, and the fan-out's nodes) inherits this:
    # a snapshotter records a startup profile of an image's first run by default, and every later "cold" start of
    # that name, through containerd or `run`, would then replay it. Only the `-profiled` names carry one.
    recording = os.environ.get("IMAGESTREAM_PROFILE")
    os.environ["IMAGESTREAM_PROFILE"] = "never"
    peers = []
    for p in PEERS:
        if p.key not in wanted:
            continue
        gone = missing(p)
        if gone:
            out["skipped"][p.key] = (f"not built: {', '.join(gone)} missing in {BIN} "
                                     "(scripts/peers/build; ctr-remote: IMAGESTREAM_CTR_REMOTE)")
        else:
            peers.append(p)
    work = setup.workdir / "peers"
    work.mkdir(exist_ok=True)
    registry = Registry(work / "registry", port) if peers else None
    via_link = ""
    try:
        if registry is not None:
            registry.start()
            via_link = setup.link.forward(port, registry.address)
        dist_link = setup.link.forward(port + 1, setup.env["IMAGESTREAM_DISTRIBUTION_LISTEN"])
        _name_in_certificates(dist_link)
        for i, cell in enumerate(images):
            try:
                image = cell.image = cell.image or cell.make()
            except Exception as e:  # noqa: BLE001 - recorded; the images measured already stay
                if i == 0:
                    raise
                out["errors"] = {**out.get("errors", {}), cell.label: f"{type(e).__name__}: {str(e)[-600:]}"}
                log(f"baselines, {cell.label} image: not measured: {out['errors'][cell.label]}")
                continue
            log(f"baselines, {image.label} image: {' '.join(image.command)[:100]}")
            info: dict = {"runs": cell.runs, "command": list(image.command), "skipped": {}}
            out["images"][image.label] = info
            out["by_image"][image.label] = cells = {}
            image_peers = list(peers)
            repo = f"{REPO}/{image.label}"
            if registry is not None:
                prep = work / f"prepare-{image.label}"  # each image's own: the builder's state, the gzip layout
                prep.mkdir()
                try:
                    info["images_prepared_s"], failed = prepare_images(registry, cell.source, prep, peers, repo,
                                                                       image.command)
                finally:
                    shutil.rmtree(prep, ignore_errors=True)  # the builder's copy of the image is pushed by now
                info["orig_bytes"] = info["images_prepared_s"].pop("orig_bytes")  # the gzip image containerd pulls
                info["skipped"].update(failed)
                image_peers = [p for p in peers if p.key not in failed]
            if not cell.fallback:
                info["skipped"]["imagestream_fallback"] = "not run on this image (a full pull through every tier)"
            _measure_image(setup, cell, image_peers, registry, via_link, dist_link, repo, work, cells)
            if progress is not None:
                progress(out)
            if i == 0 and fanout_n:
                out["fanout"] = _fan_outs(setup, image, image_peers, registry, via_link, dist_link, repo, work, fanout_n)
                if progress is not None:
                    progress(out)
    finally:
        if registry is not None:
            registry.close()
        if recording is None:
            os.environ.pop("IMAGESTREAM_PROFILE", None)
        else:
            os.environ["IMAGESTREAM_PROFILE"] = recording
        if out["by_image"]:  # the stack's snapshotter, restarted with "never" above, is left as it was found
            try:
                fresh_snapshotter()
            except Exception as e:  # noqa: BLE001 - an error of the run itself, if any, is the one to see
                log(f"baselines: the stack's snapshotter was not restarted: {e}")
    return out


def _measure_image(setup: Setup, cell: Cell, peers: list[Peer], registry: Registry | None, via_link: str,
                   dist_link: str, repo: str, work: pathlib.Path, cells: dict) -> None:
    from benchmarks import coldstart

    image, runs = cell.image, cell.runs
    assert image is not None
    for rep in range(runs):
        for p in peers:
            c = cells.setdefault(p.key, {"samples": [], "pull_s": [], "run_s": [], "registry_gets": [],
                                         "registry_blob_gets": [], "link_bytes": []})
            offset, before = registry.offset(), setup.link.forward_stats(via_link)["down_bytes"]
            r = cold_start(work / "node", p, f"{via_link}/{repo}:{p.tag}", via_link, f"b{rep}", image)
            gets = registry.gets_since(offset)
            c["samples"].append(r["seconds"])
            c["pull_s"].append(r["pull_s"])
            c["run_s"].append(r["run_s"])
            c["registry_gets"].append(gets["gets"])
            c["registry_blob_gets"].append(gets["blob_gets"])
            c["link_bytes"].append(setup.link.forward_stats(via_link)["down_bytes"] - before)
            log(f"  {image.label} run {rep + 1}/{runs} {p.key:22} {r['seconds']:6.2f} s (pull {r['pull_s']:.2f} s, run "
                f"{r['run_s']:.2f} s), {gets['gets']} registry GETs, {c['link_bytes'][-1] / 1e6:.1f} MB")
        paths = [("imagestream_containerd", lambda: _imagestream_containerd(setup, image, image.name, dist_link, work)),
                 ("imagestream_containerd_profile",
                  lambda: _imagestream_containerd(setup, image, image.profiled, dist_link, work)),
                 ("imagestream_run", lambda: _imagestream_run(setup, image, image.name, "stream_cold")),
                 ("imagestream_profile", lambda: _imagestream_run(setup, image, image.profiled, "stream_profile"))]
        if cell.fallback:
            paths.append(("imagestream_fallback", lambda: _imagestream_run(setup, image, image.name, "full_pull")))
        for key, fn in paths:
            c = cells.setdefault(key, {"samples": [], "link_bytes": [], "blocking_fetches": []})
            setup.empty_caches()
            fetches = coldstart.blocking_fetches() if key != "imagestream_fallback" else 0
            r = fn()
            c["samples"].append(r["seconds"])
            c["link_bytes"].append(r["link_bytes"])
            if key != "imagestream_fallback":
                c["blocking_fetches"].append(coldstart.blocking_fetches() - fetches)
            for extra in ("pull_s", "run_s"):
                if extra in r:
                    c.setdefault(extra, []).append(r[extra])
            log(f"  {image.label} run {rep + 1}/{runs} {key:22} {r['seconds']:6.2f} s, {r['link_bytes'] / 1e6:.1f} MB")
    for c in cells.values():
        _summary(c)


def _fan_outs(setup: Setup, image: Image, peers: list[Peer], registry: Registry | None, via_link: str, dist_link: str,
              repo: str, work: pathlib.Path, n: int) -> dict:
    """N cold nodes of each path start the image at once over the one link."""
    from benchmarks import fanout

    fo: dict = {"n": n, "image": image.label, "by_path": {}}

    def record(key: str, firsts: list[float], **extra) -> None:  # type: ignore[no-untyped-def]
        fo["by_path"][key] = {"start_seconds": firsts, "start_median_s": statistics.median(firsts),
                              "start_max_s": max(firsts), **extra}
        log(f"  fan-out N={n} {key:22} median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s")

    for p in peers:
        offset, before = registry.offset(), setup.link.forward_stats(via_link)["down_bytes"]
        firsts = fan_out(work, p, f"{via_link}/{repo}:{p.tag}", via_link, n, image)
        record(p.key, firsts, registry_gets=registry.gets_since(offset)["gets"],
               link_bytes=setup.link.forward_stats(via_link)["down_bytes"] - before)
    # imagestream: N nodes (node cache, FUSE client and, for containerd, the snapshotter and a containerd each)
    # behind the one zonal cache, which is emptied first; cold, then on the name with a startup profile
    def link_bytes() -> int:  # the regional store's link and, for containerd's manifests, the OCI endpoint's
        return setup.link.stats()["down_bytes"] + setup.link.forward_stats(dist_link)["down_bytes"]

    for key, name, through_containerd in (("imagestream_run", image.name, False),
                                          ("imagestream_profile", image.profiled, False),
                                          ("imagestream_containerd", image.name, True),
                                          ("imagestream_containerd_profile", image.profiled, True)):
        setup.empty_caches()
        nodes = fanout.NodeCaches(setup.workdir / "fanout", n, snapshotter=through_containerd)
        before = link_bytes()
        try:
            firsts = (_imagestream_containerd_fan_out(image, name, dist_link, nodes, work) if through_containerd
                      else fanout.start_all(setup, image, nodes, name=name))
        finally:
            nodes.close()
        record(key, firsts, link_bytes=link_bytes() - before)
    return fo


def _imagestream_run(setup: Setup, image: Image, name: str, mode: str) -> dict:
    from benchmarks import coldstart

    return coldstart.start_python(setup, name, mode, command=image.command, expect=image.expect)


def _name_in_certificates(address: str) -> None:
    """containerd dials the regional OCI endpoint at the link's address: with TLS on, the endpoint's
    certificate must name it. Certificates are issued again with it, and the chunk store (which serves the
    endpoint and loads its certificate at start) restarted."""
    from imagestream import tls
    from imagestream_dev.stack import certs, local

    if not tls.enabled():
        return
    certs.ensure(extra_hosts=(address.rpartition(":")[0],))
    local.down(lambda _: None, only="chunk_store")
    local.up(lambda _: None, only="chunk_store")


def _containerd(directory: pathlib.Path, snapshotter_socket: str, dist_link: str):  # type: ignore[no-untyped-def]
    from snapshotter.containerd_local import PrivateContainerd

    return PrivateContainerd(directory, snapshotter_socket, (dist_link,),
                             bin_dir=BIN / "ctrd" if os.access(BIN / "ctrd" / "containerd", os.X_OK) else None)


def _cri_pull_and_run(daemon, image: Image, ref: str, name: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """CRI pull, then `ctr run --snapshotter imagestream` the image's command: perf_counter() when the pull
    ended and when the first line came."""
    from snapshotter.cri import pull

    pull(daemon.socket, ref)
    pulled = time.perf_counter()
    proc = subprocess.Popen([daemon._binary("ctr"), "--address", daemon.socket, "--namespace", "k8s.io", "run",
                             "--rm", "--snapshotter", "imagestream", ref, name, *image.command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        first = time.perf_counter()
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if line.decode(errors="replace").strip() != image.expect or code != 0:
        raise RuntimeError(f"ctr run (imagestream) exit {code}, output {line!r}: {proc.stderr.read().decode()[-1500:]}")
    return pulled, first


def _imagestream_containerd(setup: Setup, image: Image, name: str, dist_link: str, work: pathlib.Path) -> dict:
    """A fresh snapshotter and containerd 2.2.9 on a cold node: CRI pull of `name` through the link, `ctr run` to
    first output."""
    from imagestream import config

    fresh_snapshotter()
    daemon = _containerd(work / "imagestream-ctrd", config.snapshotter_socket(), dist_link)
    ref = f"{dist_link}/{name}:latest"  # the name CRI records the pulled image under
    before = setup.link.stats()["down_bytes"] + setup.link.forward_stats(dist_link)["down_bytes"]
    try:
        daemon.start()
        started = time.perf_counter()
        pulled, first = _cri_pull_and_run(daemon, image, ref, "s")
        after = setup.link.stats()["down_bytes"] + setup.link.forward_stats(dist_link)["down_bytes"]
    finally:
        daemon.remove()
    return {"seconds": first - started, "pull_s": pulled - started, "run_s": first - pulled, "link_bytes": after - before}


def _imagestream_containerd_fan_out(image: Image, name: str, dist_link: str, nodes, work: pathlib.Path) -> list[float]:  # type: ignore[no-untyped-def]
    """Each node's containerd 2.2.9 (over its own snapshotter) CRI-pulls and runs the image's `name`, all at once."""
    ref = f"{dist_link}/{name}:latest"
    daemons = [_containerd(work / f"fan-imagestream-{i}", sock, dist_link) for i, sock in enumerate(nodes.snapshotter_sockets)]
    try:
        for d in daemons:
            d.start()
        started = time.perf_counter()
        return _at_once(len(daemons), lambda i: _cri_pull_and_run(daemons[i], image, ref, f"fan{i}")[1] - started)
    finally:
        for d in daemons:
            d.remove()


# -- targets ---------------------------------------------------------------------------

def best_peer(cells: dict) -> tuple[str, float] | None:
    lazy = [(k, cells[k]["median"]) for k in LAZY if k in cells]
    return min(lazy, key=lambda kv: kv[1]) if lazy else None
