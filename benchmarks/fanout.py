"""Fan-out: N cold nodes behind one zonal cache start the same image at once.

For each N, the zonal cache (Redis) is emptied and N nodes are started, each a
`node_cache` and a `fuse_client` process as `imagestream_dev.stack.local.processes()`
defines them, with their own sockets, disk folder, memory and mount (the stack's own
node idles).
Then:
1. start: N `imagestream run IMAGE -- python3 ...` at once, one per node (each
   streams, with its background download of the whole image behind it); the time
   to each one's first output;
2. fetch all: every node fetches every chunk of the image at once (what their
   background downloads do to completion), in batches of 32.
Regional reads are counted where they happen, in Cassandra's own metrics
(`system_views.local_read_latency`, reads of the chunks table), before and after;
bytes over the regional link are counted by the link's proxy. Each unique chunk
is the image's chunks plus its index.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

from benchmarks.harness import end_under, stop_group
from benchmarks.setup import Image, Setup, log


class NodeCaches:
    """N extra cold nodes of the zone, each started from the stack's own definitions (`local.processes()`): a
    node cache with its own socket, disk folder and memory, the node's FUSE client over it (its own socket and
    mount) and, with `snapshotter`, the containerd snapshotter over both. The stack's own node idles."""

    def __init__(self, workdir: pathlib.Path, n: int, memory: str = "64MiB", snapshotter: bool = False) -> None:
        from imagestream_dev.stack import local

        self.dirs = [workdir / f"node-{i}" for i in range(n)]
        self.sockets = [str(d / "node.sock") for d in self.dirs]
        self.fuse_sockets = [str(d / "fuse.sock") for d in self.dirs]
        self.snapshotter_sockets = [str(d / "snapshotter.sock") for d in self.dirs]
        names = ["node_cache", "fuse_client", *(["snapshotter"] if snapshotter else [])]
        defined = {p.name: p for p in local.processes()}
        if "fuse_client" not in defined:
            raise RuntimeError("fan-out: this machine cannot mount FUSE (local.can_mount_fuse)")
        self.procs: list[subprocess.Popen] = []
        try:
            for d, sock, fuse, snap in zip(self.dirs, self.sockets, self.fuse_sockets, self.snapshotter_sockets):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                node_env = {"IMAGESTREAM_NODE_CACHE_SOCKET": sock, "IMAGESTREAM_NODE_DISK_DIR": str(d / "disk"),
                            "IMAGESTREAM_NODE_MEMORY_BYTES": memory,
                            # metrics ports of their own (the stack's node holds the configured ones), chosen by the
                            # kernel when they bind: nothing is scraped here
                            "IMAGESTREAM_NODE_CACHE_METRICS": "127.0.0.1:0", "IMAGESTREAM_SNAPSHOTTER_METRICS": "",
                            "IMAGESTREAM_FUSE_SOCKET": fuse, "IMAGESTREAM_FUSE_MOUNTPOINT": str(d / "images"),
                            "IMAGESTREAM_SNAPSHOTTER_SOCKET": snap, "IMAGESTREAM_SNAPSHOTTER_ROOT": str(d / "snapshotter")}
                for name in names:  # in the stack's order: each serves the next
                    proc = defined[name]
                    with open(d / f"{name}.log", "ab") as out:
                        p = subprocess.Popen(proc.command, env={**os.environ, **proc.env, **node_env}, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                    self.procs.append(p)
                    target = {"node_cache": sock, "fuse_client": fuse, "snapshotter": snap}[name]
                    deadline = time.monotonic() + 120
                    while not local.grpc_serving("unix:" + target):
                        if p.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"{name} on {target} did not start; see {d / (name + '.log')}")
                        time.sleep(0.2)
        except BaseException:
            self.close()
            raise

    def env(self, i: int) -> dict[str, str]:
        """What a client on node i dials: its node cache and its FUSE client."""
        return {"IMAGESTREAM_NODE_CACHE_SOCKET": self.sockets[i], "IMAGESTREAM_FUSE_SOCKET": self.fuse_sockets[i]}

    def close(self) -> None:
        for p in reversed(self.procs):  # the snapshotter and the FUSE client (which unmounts) before the node cache
            stop_group(p, timeout_s=30)
        for d in self.dirs:
            end_under(d)
            shutil.rmtree(d, ignore_errors=True)


def start_all(setup: Setup, image: Image, nodes: NodeCaches, timeout_s: float = 900,
              name: str | None = None) -> list[float]:
    """`imagestream run` the image's command, under `name` (default: the image's name without a profile), on every
    node at once; seconds to each first output."""
    procs, errs = [], []
    started = time.perf_counter()
    for i in range(len(nodes.dirs)):
        err = tempfile.TemporaryFile()
        errs.append(err)
        env = {**os.environ, **nodes.env(i), "IMAGESTREAM_PROFILE": "never", "IMAGESTREAM_STREAMING": "auto"}
        procs.append(subprocess.Popen(setup.cli_args("run", name or image.name, "--", *image.command),
                                      stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True))
    firsts: dict[int, float] = {}
    try:
        waiting = {p.stdout.fileno(): i for i, p in enumerate(procs)}
        while waiting and time.perf_counter() - started < timeout_s:
            ready, _, _ = select.select(list(waiting), [], [], 1.0)
            for fd in ready:
                i = waiting.pop(fd)
                line = procs[i].stdout.readline()
                if line.decode(errors="replace").strip() != image.expect:
                    raise RuntimeError(f"node {i}: output {line!r}")
                firsts[i] = time.perf_counter() - started
        for i, p in enumerate(procs):
            code = p.wait(timeout_s)
            if code != 0 or i not in firsts:
                errs[i].seek(0)
                raise RuntimeError(f"node {i}: exit {code}: {errs[i].read()[-2000:].decode()}")
    finally:
        for p in procs:
            stop_group(p, signal.SIGINT)  # a run killed after all leaves its lease to its node, which goes next
        for e in errs:
            e.close()
    return [firsts[i] for i in range(len(procs))]


async def fetch_all(sockets: list[str], chunks, batch: int = 32) -> float:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import GrpcChunkStore

    stores = [GrpcChunkStore("unix:" + s, timeout_s=300) for s in sockets]

    async def one(store) -> int:  # type: ignore[no-untyped-def]
        n = 0
        for i in range(0, len(chunks), batch):
            async for _ in store.get_many(chunks[i : i + batch]):
                n += 1
        return n

    try:
        started = time.perf_counter()
        got = await asyncio.gather(*(one(s) for s in stores))
        seconds = time.perf_counter() - started
    finally:
        for s in stores:
            await s.close()
    if any(n != len(chunks) for n in got):
        raise RuntimeError(f"fetch all: got {got} of {len(chunks)} chunks")
    return seconds


def measure(setup: Setup, image: Image, ns=(1, 2, 4, 8)) -> dict:  # type: ignore[no-untyped-def]
    _, index = setup.image_chunks(image)
    chunks = index.chunks()
    unique = len(chunks) + 1  # and the index
    out: dict = {"image": image.label, "unique_chunks": unique, "image_compressed_bytes": image.compressed_bytes,
                 "by_n": {}}
    for n in ns:
        setup.empty_caches()  # Redis emptied: a cold zone
        nodes = NodeCaches(setup.workdir / "fanout", n)
        try:
            reads0, link0 = setup.regional_reads(), setup.link.stats()["down_bytes"]
            firsts = start_all(setup, image, nodes)
            reads1, link1 = setup.regional_reads(), setup.link.stats()["down_bytes"]
            fetch_s = asyncio.run(fetch_all(nodes.sockets, chunks))
            reads2, link2 = setup.regional_reads(), setup.link.stats()["down_bytes"]
        finally:
            nodes.close()
        cell = {
            "start_seconds": firsts, "start_median_s": statistics.median(firsts), "start_max_s": max(firsts),
            "fetch_all_seconds": fetch_s,
            "regional_reads_start": reads1 - reads0, "regional_reads_total": reads2 - reads0,
            "regional_reads_per_unique_chunk": (reads2 - reads0) / unique,
            "link_bytes_total": link2 - link0, "link_bytes_per_image_byte": (link2 - link0) / image.compressed_bytes,
            "link_bytes_start": link1 - link0,
        }
        out["by_n"][str(n)] = cell
        log(f"  fan-out N={n}: start median {cell['start_median_s']:.2f} s (max {cell['start_max_s']:.2f} s), "
            f"all chunks on all nodes in {fetch_s:.1f} s, regional reads per unique chunk "
            f"{cell['regional_reads_per_unique_chunk']:.3f}, link bytes per image byte {cell['link_bytes_per_image_byte']:.3f}")
    return out

