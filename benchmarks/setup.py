"""What the parts of `python -m benchmarks` share: the stack behind the emulated link, the images, counters."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import CACHE
from benchmarks.link import Link, LinkProfile

# what "a python3 program importing a set of standard modules" is, everywhere in these benchmarks (the baselines
# run the same program on every path)
PROGRAM = "import json, sqlite3, http.client, email.parser, asyncio; print('ok')"
PYTHON = ("python3", "-u", "-c", PROGRAM)  # how every path runs it (unbuffered: the first line is the clock)


@dataclasses.dataclass
class Image:
    label: str  # "base" | "large"
    name: str  # never profiled
    profiled: str  # the same image under a second name, with a recorded startup profile
    filler_mb: int
    content_bytes: int = 0  # file contents, uncompressed (what the registry reports)
    compressed_bytes: int = 0  # every chunk as stored and transferred (what a full pull moves)
    chunks: int = 0
    index_hash: str = ""
    index_bytes: int = 0  # the index itself, compressed (fetched on mount)
    command: tuple[str, ...] = PYTHON  # what a start runs in it, the same on every path
    expect: str = "ok"  # the command's first line of output, where the clock stops

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def debian_image(filler_mb: int) -> pathlib.Path:
    """The Debian bookworm minbase + python3 image (OCI layout), plus filler_mb MiB of never-read data."""
    from imagestream_dev import imagebuild

    return imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci", filler_mb=filler_mb)


def debian_large_image() -> pathlib.Path:
    """The real large image (imagebuild.LARGE_PACKAGES: a JDK and Python's scientific stack, about 1.6 GB)."""
    from imagestream_dev import imagebuild

    return imagebuild.build_debian_large(CACHE, CACHE / "images", fmt="oci")


def large_command() -> tuple[tuple[str, ...], str]:
    """imagebuild.LARGE_COMMAND run unbuffered, and its first line of output (numpy, scipy.linalg and pandas loaded)."""
    from imagestream_dev import imagebuild

    argv = imagebuild.LARGE_COMMAND
    return (argv[0], "-u", *argv[1:]), "1 2"


def _tiny_keep(rel: str) -> bool:
    """What python3 needs to run the program (and nothing of apt, perl, docs, locales, ...)."""
    if rel in ("bin", "lib", "lib64", "sbin", "tmp", "root", "usr/bin/python3", "usr/bin/python3.11"):
        return True
    if rel.startswith(("usr/lib/x86_64-linux-gnu/perl", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/python3.11/test/",
                       "usr/lib/python3.11/pydoc_data/", "usr/lib/python3.11/lib2to3/", "usr/lib/python3.11/idlelib/")):
        return False
    return rel.startswith(("etc/", "usr/lib64/", "usr/lib/python3.11/", "usr/lib/x86_64-linux-gnu/", "opt/"))


def tiny_image(filler_mb: int) -> pathlib.Path:
    """A tiny real image for the quick mode: the Debian tree cut down to python3, its libraries and stdlib."""
    from imagestream_dev import imagebuild

    debian_image(filler_mb)  # builds the (filler) tree
    rootfs = imagebuild.build_rootfs(CACHE / "rootfs")
    if filler_mb:
        rootfs = rootfs.parent / f"{rootfs.name}-filler{filler_mb}m-s0"
    final = CACHE / "images" / (f"tiny-python-filler{filler_mb}m-oci" if filler_mb else "tiny-python-oci")
    if final.exists():
        return final
    with tempfile.TemporaryDirectory(dir=CACHE / "images", prefix=".tmp-tiny-") as td:
        layer = imagebuild.write_layer(rootfs, pathlib.Path(td) / "layer.tar", compression="none", paths=_tiny_keep)
        imagebuild.write_oci_layout_from_layers([layer.path], pathlib.Path(td) / "layout", compression="none")
        os.rename(pathlib.Path(td) / "layout", final)
    return final


class Setup:
    """A running stack (own or given) whose zone reaches the regional store only through `link`."""

    def __init__(self, env: dict[str, str], workdir: pathlib.Path, link: Link) -> None:
        self.env = env
        self.workdir = workdir
        self.link = link
        self.regional = env["IMAGESTREAM_CHUNK_STORE_LISTEN"]
        self.zonal = env["IMAGESTREAM_ZONAL_CACHE_LISTEN"]
        self._cassandra = None

    # -- the zone and its link ----------------------------------------------------
    def route_zone_through_link(self) -> None:
        """Zonal and node caches dial the link's address for the regional store; restarts them cold."""
        os.environ["IMAGESTREAM_ZONAL_UPSTREAMS"] = self.link.address
        os.environ["IMAGESTREAM_NODE_UPSTREAMS"] = f"{self.zonal},{self.link.address}"
        self.empty_caches()

    def route_zone_direct(self) -> None:
        """Back to the stack's own settings (and cold caches)."""
        os.environ["IMAGESTREAM_ZONAL_UPSTREAMS"] = self.env["IMAGESTREAM_ZONAL_UPSTREAMS"]
        os.environ["IMAGESTREAM_NODE_UPSTREAMS"] = self.env["IMAGESTREAM_NODE_UPSTREAMS"]
        self.empty_caches()

    def shape(self, profile: LinkProfile) -> None:
        self.link.shape(profile)

    def empty_caches(self) -> None:
        """A cold node in a cold zone: node memory and disk, Redis, and earlier full pulls, all gone."""
        from imagestream import config
        from imagestream_dev.stack import local

        local.empty_caches()
        shutil.rmtree(config.home() / "pulled", ignore_errors=True)

    # -- commands -------------------------------------------------------------------
    def cli_args(self, *args: str) -> list[str]:
        """The imagestream command line of this checkout (not whichever `imagestream` is on PATH)."""
        return [sys.executable, "-m", "imagestream_cli", *args]

    def cli(self, *args: str, env: dict | None = None, timeout: float = 1800) -> str:
        result = subprocess.run(self.cli_args(*args), capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
        if result.returncode != 0:
            raise RuntimeError(f"imagestream {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout

    # -- images ---------------------------------------------------------------------
    def prepare_image(self, label: str, filler_mb: int, tiny: bool = False, source: pathlib.Path | None = None,
                      command: tuple[str, ...] = PYTHON, expect: str = "ok") -> Image:
        """Build (cached), push, publish under a second name with a startup profile, measure its size."""
        if source is None:
            source = tiny_image(filler_mb) if tiny else debian_image(filler_mb)
        image = Image(label, f"bench/{label}", f"bench/{label}-profiled", filler_mb, command=command, expect=expect)
        started = time.monotonic()
        out = self.cli("push", "-q", str(source), image.name, env={"IMAGESTREAM_REGION": self.regional})
        log(f"  {out.strip()} [{time.monotonic() - started:.0f} s]")
        # The second name is pushed too (its chunks are all stored already): a push writes the name into the
        # manifest's layer annotations, which is the name containerd's snapshotter attaches and replays the
        # profile of, so a copy of the first name's record would stream through containerd without a profile.
        self.cli("push", "-q", str(source), image.profiled, env={"IMAGESTREAM_REGION": self.regional})
        asyncio.run(self._measure(image))
        # the profile is recorded on a warm node, not over the emulated link (it is set-up, not measured)
        self.cli("profile", image.profiled, "--", *command)
        return image

    async def _measure(self, image: Image) -> None:
        from imagestream.digests import Digest
        from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
        from imagestream.index import load_index

        store, registry = GrpcChunkStore(self.regional), GrpcImageNames(self.regional)
        try:
            record = await registry.resolve(image.name)
            index_digest = Digest.from_proto(record.index)
            index = await load_index(store, index_digest)
            chunks = index.chunks()
            image.content_bytes, image.chunks = record.content_bytes, len(chunks)
            image.index_hash, image.index_bytes = index_digest.hash, len(await store.get(index_digest))
            total = 0
            for i in range(0, len(chunks), 64):
                async for _, data in store.get_many(chunks[i : i + 64]):
                    total += len(data)
            image.compressed_bytes = total
            profiled = await registry.resolve(image.profiled)
            if profiled.index != record.index:
                raise RuntimeError(f"{image.profiled} is not the same content as {image.name}")
        finally:
            await store.close()
            await registry.close()

    def image_chunks(self, image: Image):  # type: ignore[no-untyped-def]
        """(index digest, index) of an image, read straight from the regional store (no link, no caches)."""
        from imagestream.digests import Digest
        from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
        from imagestream.index import load_index

        async def fetch():  # type: ignore[no-untyped-def]
            store, registry = GrpcChunkStore(self.regional), GrpcImageNames(self.regional)
            try:
                record = await registry.resolve(image.name)
                digest = Digest.from_proto(record.index)
                return digest, await load_index(store, digest)
            finally:
                await store.close()
                await registry.close()

        return asyncio.run(fetch())

    # -- counters -------------------------------------------------------------------
    def regional_reads(self) -> int:
        """Reads of the chunks table that reached Cassandra (its own metrics, system_views.local_read_latency).

        Every chunk the regional store serves is one such read; nothing else in the stack reads that
        table while a benchmark runs, except FindMissingChunks (push, publish), which the benchmarks
        never do while they count.
        """
        from imagestream_dev.stack import credentials

        if self._cassandra is None:
            port = int(self.env.get("IMAGESTREAM_CASSANDRA_PORT", "9042"))
            cluster = credentials.cassandra_admin(["127.0.0.1"], port)
            self._cassandra = (cluster, cluster.session)
        rows = self._cassandra[1].execute(
            "SELECT count FROM system_views.local_read_latency WHERE keyspace_name = %s AND table_name = 'chunks'",
            (os.environ.get("IMAGESTREAM_CASSANDRA_KEYSPACE", "imagestream"),))
        return int(rows.one().count)

    def remove_images(self, images: list[Image]) -> None:
        for image in images:
            for name in (image.name, image.profiled):
                subprocess.run(self.cli_args("rm", name), capture_output=True, env={**os.environ, "IMAGESTREAM_REGION": self.regional})

    def close(self) -> None:
        if self._cassandra is not None:
            self._cassandra[0].shutdown()
            self._cassandra = None
