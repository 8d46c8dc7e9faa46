"""Fan-out: N cold nodes behind one zonal cache start the same image at once.

For each N, the zonal cache (Redis) is emptied and N node caches are started,
each a `node_cache` process as `imagestream_dev.stack.local.processes()` defines it,
with its own socket, disk folder and memory (the stack's own node cache idles).
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

from benchmarks.coldstart import unmount_runs
from benchmarks.harness import stop_group
from benchmarks.setup import PROGRAM, Image, Setup, log


class NodeCaches:
    """N extra node caches of the zone: started from the stack's own definition of `node_cache`."""

    def __init__(self, workdir: pathlib.Path, n: int, memory: str = "64MiB") -> None:
        from imagestream_dev.stack import local

        self.dirs = [workdir / f"node-{i}" for i in range(n)]
        self.sockets = [str(d / "node.sock") for d in self.dirs]
        proc = next(p for p in local.processes() if p.name == "node_cache")
        self.procs: list[subprocess.Popen] = []
        try:
            for d, sock in zip(self.dirs, self.sockets):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                env = {**os.environ, **proc.env, "IMAGESTREAM_NODE_CACHE_SOCKET": sock,
                       "IMAGESTREAM_NODE_DISK_DIR": str(d / "disk"), "IMAGESTREAM_NODE_MEMORY_BYTES": memory,
                       # a metrics port of its own (the stack's node cache holds the configured one),
                       # chosen by the kernel when it binds: nothing is scraped here
                       "IMAGESTREAM_NODE_CACHE_METRICS": "127.0.0.1:0"}
                with open(d / "node_cache.log", "ab") as out:
                    self.procs.append(subprocess.Popen(proc.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL, start_new_session=True))
            deadline = time.monotonic() + 120
            for p, sock in zip(self.procs, self.sockets):
                while not local.grpc_serving("unix:" + sock):
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"node cache on {sock} did not start; see its node_cache.log")
                    time.sleep(0.2)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def start_all(setup: Setup, image: Image, sockets: list[str], timeout_s: float = 900) -> list[float]:
    """Start the python program on every node at once; seconds to each first output."""
    procs, errs = [], []
    started = time.perf_counter()
    for sock in sockets:
        err = tempfile.TemporaryFile()
        errs.append(err)
        env = {**os.environ, "IMAGESTREAM_NODE_CACHE_SOCKET": sock, "IMAGESTREAM_PROFILE": "never",
               "IMAGESTREAM_STREAMING": "auto"}
        procs.append(subprocess.Popen(setup.cli_args("run", image.name, "--", "python3", "-u", "-c", PROGRAM),
                                      stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True))
    firsts: dict[int, float] = {}
    try:
        waiting = {p.stdout.fileno(): i for i, p in enumerate(procs)}
        while waiting and time.perf_counter() - started < timeout_s:
            ready, _, _ = select.select(list(waiting), [], [], 1.0)
            for fd in ready:
                i = waiting.pop(fd)
                line = procs[i].stdout.readline()
                if line.strip() != b"ok":
                    raise RuntimeError(f"node {i}: output {line!r}")
                firsts[i] = time.perf_counter() - started
        for i, p in enumerate(procs):
            code = p.wait(timeout_s)
            if code != 0 or i not in firsts:
                errs[i].seek(0)
                raise RuntimeError(f"node {i}: exit {code}: {errs[i].read()[-2000:].decode()}")
    finally:
        for p in procs:
            if stop_group(p, signal.SIGINT):
                unmount_runs()
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
            firsts = start_all(setup, image, nodes.sockets)
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

