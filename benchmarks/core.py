"""The core streaming path on loopback: push throughput, mount time, cold and warm start, warm reads.

    python -m benchmarks.core [--runs 5]

Starts a private stack, pushes the Debian python3 image and an image holding
one 200 MB file, and measures; writes docs/benchmarks/core.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import subprocess
import tarfile
import tempfile
import time

from benchmarks.harness import CACHE, ROOT, cli, drop_page_cache, median_of, private_stack, timed, write_report

BIG_FILE_MB = 200


def big_file_image(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """An image whose one file is 200 MB of incompressible data, and that file on local disk."""
    from imagestream_dev import imagebuild

    src = CACHE / "bench" / "bigfile"
    data = src / "big.bin"
    if not data.exists():
        src.mkdir(parents=True, exist_ok=True)
        rng = random.Random(1)
        with open(data, "wb") as f:
            for _ in range(BIG_FILE_MB):
                f.write(rng.randbytes(1 << 20))
    layout = out / "bigfile-oci"
    if not layout.exists():
        with tempfile.TemporaryDirectory() as td:
            tar_path = pathlib.Path(td) / "layer.tar"
            with tarfile.open(tar_path, "w") as tar:
                tar.add(data, arcname="big.bin")
            imagebuild.write_oci_layout_from_layers([tar_path], layout, compression="none")
    return layout, data


def read_all(path: pathlib.Path) -> float:
    """Sequential read with 1 MiB reads; MB/s."""
    started = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n / 1e6 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()

    from imagestream_dev import imagebuild
    from imagestream_dev.stack import local

    debian = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    rootfs = imagebuild.build_rootfs(CACHE / "rootfs")
    big_layout, big_local = big_file_image(CACHE / "images")
    r: dict = {"runs": args.runs}
    with private_stack():
        # push: the first push of each image into an empty region, then a second (all chunks deduplicated)
        for label, src, name in (("debian", debian, "bench/debian"), ("bigfile", big_layout, "bench/bigfile")):
            out = cli("push", "-q", str(src), name).stdout
            r[f"push_{label}"] = out.strip()
        content_mb = 161.2
        push_line = r["push_debian"]
        r["push_debian_mb_s"] = float(push_line.rsplit(" MB/s", 1)[0].rsplit("; ", 1)[1])
        content_mb = float(push_line.split(" files, ")[1].split(" MB")[0])
        r["debian_content_mb"] = content_mb

        mnt = pathlib.Path(tempfile.mkdtemp(prefix="bench-mnt-"))

        def mount_once() -> float:
            from fuse_client import mounts

            m = mounts.mount("bench/debian", mnt)
            mounts.unmount(mnt)
            return m.mount_seconds

        r["mount_s"] = median_of(args.runs, mount_once)
        r["mount_command_s"] = median_of(args.runs, lambda: timed(lambda: (cli("mount", "bench/debian", str(mnt)),
                                                                         cli("umount", str(mnt)))))

        def run_pass() -> float:
            return timed(lambda: cli("run", "bench/debian", "--", "python3", "-c", "pass"))

        r["cold_python_pass_s"] = median_of(args.runs, run_pass, before=local.empty_caches)
        r["warm_python_pass_s"] = median_of(args.runs, run_pass)
        r["local_chroot_python_pass_s"] = median_of(
            args.runs, lambda: timed(lambda: subprocess.run(["chroot", str(rootfs), "python3", "-c", "pass"], check=True)))

        # warm sequential reads: chunks local on the node; page cache dropped (first read) and hot (second)
        from fuse_client import mounts

        mounts.mount("bench/bigfile", mnt)
        read_all(mnt / "big.bin")  # brings every chunk to the node
        mounts.unmount(mnt)
        can_drop = drop_page_cache()

        def fuse_read_node_local() -> float:
            drop_page_cache()  # the node keeps the image's inodes, and the kernel its pages, across mounts
            mounts.mount("bench/bigfile", mnt)
            try:
                return read_all(mnt / "big.bin")
            finally:
                mounts.unmount(mnt)

        def disk_read_cold() -> float:
            drop_page_cache()
            return read_all(big_local)

        r["fuse_seq_read_node_local_mb_s"] = median_of(args.runs, fuse_read_node_local)
        r["disk_seq_read_cold_cache_mb_s"] = median_of(args.runs, disk_read_cold)
        mounts.mount("bench/bigfile", mnt)
        read_all(mnt / "big.bin")
        r["fuse_seq_read_page_cache_mb_s"] = median_of(args.runs, lambda: read_all(mnt / "big.bin"))
        mounts.unmount(mnt)
        read_all(big_local)
        r["disk_seq_read_page_cache_mb_s"] = median_of(args.runs, lambda: read_all(big_local))
        r["page_cache_dropped"] = can_drop
        os.rmdir(mnt)

    m = lambda k: r[k]["median"]  # noqa: E731
    table = [
        ("what", "result", "target"),
        ("push, Debian python3 image (first push, empty region)", f"{r['push_debian_mb_s']:.1f} MB/s of file content", ""),
        ("mount (resolve + index + FUSE init), in the FUSE client", f"{m('mount_s') * 1000:.0f} ms", "< 1 s"),
        ("`imagestream mount` + `umount` commands, end to end", f"{m('mount_command_s'):.2f} s", ""),
        ("cold `run -- python3 -c pass` (node and zonal caches empty)", f"{m('cold_python_pass_s'):.2f} s", "< 3 s"),
        ("warm `run -- python3 -c pass` (all local)", f"{m('warm_python_pass_s'):.2f} s", ""),
        ("`chroot rootfs python3 -c pass` (no streaming, for scale)", f"{m('local_chroot_python_pass_s'):.3f} s", ""),
        (f"sequential read {BIG_FILE_MB} MB, FUSE, chunks on node, page cache empty",
         f"{m('fuse_seq_read_node_local_mb_s'):.0f} MB/s", ""),
        (f"sequential read {BIG_FILE_MB} MB, local disk, page cache empty",
         f"{m('disk_seq_read_cold_cache_mb_s'):.0f} MB/s", ""),
        ("  ratio FUSE / local disk (page cache empty)",
         f"{m('fuse_seq_read_node_local_mb_s') / m('disk_seq_read_cold_cache_mb_s'):.2f}", ">= 0.5"),
        (f"sequential read {BIG_FILE_MB} MB, FUSE, page cache hot", f"{m('fuse_seq_read_page_cache_mb_s'):.0f} MB/s", ""),
        (f"sequential read {BIG_FILE_MB} MB, local disk, page cache hot", f"{m('disk_seq_read_page_cache_mb_s'):.0f} MB/s", ""),
        ("  ratio FUSE / local disk (page cache hot)",
         f"{m('fuse_seq_read_page_cache_mb_s') / m('disk_seq_read_page_cache_mb_s'):.2f}", ">= 0.5"),
    ]
    write_report("core", r, table, args.out)


if __name__ == "__main__":
    main()
