"""What the cluster tests share: images with known contents, reading them back, counting what went wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import pathlib
import random
import subprocess
import tarfile
import threading
import time

from imagestream import config
from imagestream.digests import Digest


def make_image(tmp: pathlib.Path, seed: int, files: int = 80, big_mb: int = 12) -> tuple[pathlib.Path, dict[str, str], list[Digest]]:
    """An OCI layout of `files` small and medium files and one big one, from `seed`.

    Returns the layout, {path: sha256} and the big file's 1 MiB chunk digests (upload order)."""
    from imagestream_dev import imagebuild

    rng = random.Random(seed)
    expected: dict[str, str] = {}
    layer = tmp / f"layer-{seed}.tar"
    big = rng.randbytes(big_mb << 20)
    with tarfile.open(layer, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            expected[name] = hashlib.sha256(data).hexdigest()

        add("big/blob.bin", big)
        for i in range(files):
            add(f"files/d{i % 7}/f{i}.dat", rng.randbytes(rng.choice([700, 5_000, 40_000, 150_000, 600_000])))
    out = tmp / f"image-{seed}"
    imagebuild.write_oci_layout_from_layers([layer], out, compression="none")
    return out, expected, [Digest.of(big[i:i + (1 << 20)]) for i in range(0, len(big), 1 << 20)]


@dataclasses.dataclass
class Reads:
    done: int = 0
    failed: int = 0
    wrong: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


def read_all(mnt: pathlib.Path, expected: dict[str, str], reads: Reads, started: threading.Event | None = None,
             after: int = 5) -> Reads:
    """Read every file under `mnt` and compare; `started` is set once `after` files have been read."""
    for i, (name, sha) in enumerate(expected.items()):
        try:
            with open(mnt / name, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            reads.failed += 1
            reads.errors.append(f"{name}: {e}")
        else:
            if got != sha:
                reads.wrong += 1
                reads.errors.append(f"{name}: wrong bytes")
        reads.done += 1
        if started is not None and i + 1 >= after:
            started.set()
    if started is not None:
        started.set()
    return reads


def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def regional(call):  # type: ignore[no-untyped-def]
    """call(store) on the region's chunk store, from synchronous test code."""
    from imagestream.rpc.client import GrpcChunkStore

    async def run():  # type: ignore[no-untyped-def]
        store = GrpcChunkStore(config.get("region"))
        try:
            return await call(store)
        finally:
            await store.close()

    return asyncio.run(run())


def regional_missing(digests: list[Digest]) -> list[Digest]:
    return regional(lambda store: store.find_missing(digests))


async def _image_index(store, name: str):  # type: ignore[no-untyped-def]
    """(index digest, index) of image `name`, resolved by the region."""
    from imagestream.index import load_index
    from imagestream.rpc.client import GrpcImageNames

    images = GrpcImageNames(config.get("region"))
    try:
        digest = Digest.from_proto((await images.resolve(name)).index)
    finally:
        await images.close()
    return digest, await load_index(store, digest)


def lost_images(names: list[str]) -> list[str]:
    """Names that do not resolve, or whose index or any chunk the region no longer has."""
    from imagestream.errors import Unavailable

    async def check(store) -> list[str]:  # type: ignore[no-untyped-def]
        lost = []
        for name in names:
            for attempt in range(5):  # a tier that timed out under load is asked again: lost is gone, not slow
                try:
                    _, index = await _image_index(store, name)
                    if await store.find_missing(index.chunks()):
                        lost.append(name)
                except Unavailable as e:
                    if attempt < 4:
                        await asyncio.sleep(2**attempt)
                        continue
                    lost.append(f"{name} ({e})")
                except Exception as e:  # noqa: BLE001 - anything else wrong here is a lost image
                    lost.append(f"{name} ({e})")
                break
        return lost

    return regional(check)


def chunk_file_names(name: str) -> set[str]:
    """The file names (HASH-SIZE) a node's disk keeps the chunks of image `name` under: its index and
    every chunk its files are made of."""

    async def names_of(store) -> set[str]:  # type: ignore[no-untyped-def]
        digest, index = await _image_index(store, name)
        return {f"{d.hash}-{d.size}" for d in [digest, *index.chunks()]}

    return regional(names_of)


def push_in_background(source: pathlib.Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(["imagestream", "push", "-q", str(source), name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_upload(proc: subprocess.Popen, chunks: list[Digest], timeout: float = 180) -> None:
    """Until the push has stored one of `chunks` in the region (its upload is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"push ended before its upload: {proc.communicate()}")
        if len(regional_missing(chunks)) < len(chunks):
            return
        time.sleep(0.1)
    raise AssertionError("the push never started uploading")


def env_without(name: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != name}


def scrub_reaching_every_replica(attempts: int = 6):  # type: ignore[no-untyped-def]
    """`imagestream scrub` until one run has checked every replica's copy (a node just restarted may not
    answer yet; the scrub says so). That run's output."""
    from tests.conftest import run_cli

    for attempt in range(attempts):
        result = run_cli("scrub", check=False)
        if "did not answer" not in result.stdout:
            return result
        time.sleep(5 * (attempt + 1))
    raise AssertionError(f"no scrub reached every replica: {result.stdout}")
