"""Which chunk size? Measured on what a real program reads at start-up.

    python -m benchmarks.chunk_size

1. Records every read that a python3 program importing a set of standard
   modules makes from the streamed Debian image (the FUSE client's
   IMAGESTREAM_RECORD_READS), on a private stack.
2. Converts the same image offline at several chunk sizes and, for each,
   maps the recorded reads onto its chunks: how many distinct chunks, and how
   many compressed bytes, a cold start must fetch; and what the image costs in
   chunks (rows in the regional store) and index size.
3. Estimates the cold-start fetch time on the default emulated regional link
   (100 Mbit/s, 20 ms round trip) two ways: each chunk fetched one after the
   other (a program's blocking reads without prefetch), and 8 at a time (a
   startup profile replayed in parallel). Round trips favour large chunks,
   bytes favour small ones; the choice should do well in both regimes.

Writes docs/benchmarks/chunk_size.{json,md}.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

from benchmarks.harness import CACHE, ROOT, private_stack, write_report

WORKLOAD = (
    "import json, sqlite3, hashlib, decimal, email.parser, urllib.parse, xml.etree.ElementTree, "
    "asyncio, http.server, logging, argparse, subprocess, pathlib, datetime, csv, zipfile; print('ok')"
)
SIZES = [64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
RTT_S, BANDWIDTH_BYTES_S, PARALLEL = 0.020, 100e6 / 8, 8


def record_reads(image: pathlib.Path) -> list[dict]:
    from fuse_client import mounts
    from imagestream_cli.push import push

    with private_stack(port_base=20400):
        push(image, "bench/trace", progress=False)
        trace = pathlib.Path(tempfile.mkstemp(suffix=".jsonl")[1])
        mnt = pathlib.Path(tempfile.mkdtemp())
        os.environ["IMAGESTREAM_RECORD_READS"] = str(trace)
        try:
            mounts.mount("bench/trace", mnt)
            try:
                out = subprocess.run(["chroot", str(mnt), "python3", "-c", WORKLOAD], capture_output=True, text=True)
                assert out.stdout.strip() == "ok", out.stderr
            finally:
                mounts.unmount(mnt)
        finally:
            del os.environ["IMAGESTREAM_RECORD_READS"]
            os.rmdir(mnt)
        reads = [json.loads(line) for line in trace.read_text().splitlines()]
        trace.unlink()
    return reads


def main() -> None:
    from imagestream_dev import imagebuild
    from imagestream.ingest.convert import convert
    from imagestream.digests import Digest
    from imagestream.index import Index
    from imagestream.ingest.source import open_image

    image = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    reads = record_reads(image)
    read_bytes = sum(r["size"] for r in reads)
    results: dict = {"workload": WORKLOAD, "reads": len(reads), "read_bytes": read_bytes, "sizes": []}
    table = [("chunk size", "chunks in image", "index KB", "chunks fetched at start", "MB fetched at start",
              "share of image", "est. fetch, serial", f"est. fetch, {PARALLEL} in parallel")]
    for size in SIZES:
        with open_image(image) as src, tempfile.TemporaryDirectory() as spool_dir:
            converted, spool = convert(src, pathlib.Path(spool_dir), size)
            index = Index(converted.index)
            by_path = {p.decode("utf-8", "surrogateescape"): ino for p, ino in index.walk()}
            touched: dict[Digest, int] = {}
            for r in reads:
                inode = index.inode(by_path[r["path"]])
                first, last = r["offset"] // size, (r["offset"] + r["size"] - 1) // size
                for ext in list(inode.extents)[first : last + 1]:
                    if ext.HasField("chunk"):
                        d = Digest.from_proto(ext.chunk)
                        touched[d] = spool.path(d).stat().st_size
            fetched = sum(touched.values())
            estimate = len(touched) * RTT_S + fetched / BANDWIDTH_BYTES_S
            parallel = len(touched) * RTT_S / PARALLEL + fetched / BANDWIDTH_BYTES_S
            stored = sum(spool.path(d).stat().st_size for d in converted.chunks)
            row = {"chunk_size": size, "image_chunks": len(converted.chunks), "index_bytes": len(converted.index_bytes),
                   "start_chunks": len(touched), "start_compressed_bytes": fetched, "image_compressed_bytes": stored,
                   "estimated_fetch_s": estimate, "estimated_parallel_fetch_s": parallel}
            results["sizes"].append(row)
            table.append((f"{size >> 10} KiB", str(len(converted.chunks)), f"{len(converted.index_bytes) / 1000:.0f}",
                          str(len(touched)), f"{fetched / 1e6:.1f}", f"{100 * fetched / stored:.1f}%",
                          f"{estimate:.2f} s", f"{parallel:.2f} s"))
            print(table[-1], flush=True)
    write_report("chunk_size", results, table, ROOT / "docs" / "benchmarks")


if __name__ == "__main__":
    main()
