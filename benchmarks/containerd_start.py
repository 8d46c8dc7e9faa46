"""`ctr run` to the container's first output: streamed through the snapshotter vs imported and unpacked.

    python -m benchmarks.containerd_start [--runs 3] [--port-base 22300]

Streamed: a fresh private containerd and a cold node (node and zonal caches
emptied), the image pulled as the kubelet pulls (CRI: manifest and config only),
then `ctr run --snapshotter imagestream`. Normal: a fresh private containerd,
`ctr images import` of the image as an OCI archive (unpacked by the default
overlayfs snapshotter), then `ctr run`. Writes docs/benchmarks/containerd_start.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import tempfile
import time

from benchmarks.harness import CACHE, ROOT, cli, fresh_snapshotter, median_of, private_stack, write_report

PROGRAM = "import sqlite3, json; print(json.dumps({'sqlite': sqlite3.sqlite_version}), flush=True)"


def first_output(daemon, *args: str, namespace: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds from starting `ctr run` to its first line of output."""
    started = time.perf_counter()
    proc = subprocess.Popen(["ctr", "--address", daemon.socket, "--namespace", namespace, "run", "--rm", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - started
    proc.wait(120)
    if "sqlite" not in line:
        raise RuntimeError(f"ctr run printed {line!r}: {proc.stderr.read()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port-base", type=int, default=22300)
    args = parser.parse_args()
    from imagestream import config
    from imagestream_dev import imagebuild
    from imagestream_dev.stack import local
    from snapshotter.containerd_local import PrivateContainerd
    from snapshotter.cri import pull

    layout = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    archive = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci-archive")
    with private_stack(args.port_base) as env:
        cli("push", "--quiet", str(layout), "debian-python:bench")
        registry = env["IMAGESTREAM_DISTRIBUTION_LISTEN"]
        ref = f"{registry}/debian-python:bench"
        samples: dict[str, list[float]] = {"stream_pull": [], "stream_run": [], "import": [], "normal_run": []}

        def streamed() -> float:
            fresh_snapshotter()
            local.empty_caches()
            daemon = PrivateContainerd(pathlib.Path(tempfile.mkdtemp(prefix="bench-ctrd-")),
                                       config.snapshotter_socket(), (registry,))
            try:
                daemon.start()
                started = time.perf_counter()
                pull(daemon.socket, ref)
                samples["stream_pull"].append(time.perf_counter() - started)
                run = first_output(daemon, "--snapshotter", "imagestream", ref, "s", "python3", "-c", PROGRAM,
                                   namespace="k8s.io")
                samples["stream_run"].append(run)
                return run
            finally:
                daemon.remove()

        def normal() -> float:
            daemon = PrivateContainerd(pathlib.Path(tempfile.mkdtemp(prefix="bench-ctrd-")),
                                       config.snapshotter_socket(), ())
            try:
                daemon.start()
                subprocess.run(["sync"], check=True)
                started = time.perf_counter()
                daemon.ctr("images", "import", "--index-name", "debian-python:local", str(archive))
                samples["import"].append(time.perf_counter() - started)
                run = first_output(daemon, "debian-python:local", "n", "python3", "-c", PROGRAM, namespace="default")
                samples["normal_run"].append(run)
                return run
            finally:
                daemon.remove()

        stream = median_of(args.runs, streamed)
        plain = median_of(args.runs, normal)
    import statistics

    med = {k: statistics.median(v) for k, v in samples.items()}
    results = {"runs": args.runs, "samples": samples, "medians": med, "streamed": stream, "normal": plain}
    table = [
        ("path", "get the image ready (s)", "`ctr run` to first output (s)", "total (s)"),
        ("streamed (CRI pull, snapshotter)", f"{med['stream_pull']:.2f}", f"{med['stream_run']:.2f}",
         f"{med['stream_pull'] + med['stream_run']:.2f}"),
        ("normal (`ctr images import`, overlayfs)", f"{med['import']:.2f}", f"{med['normal_run']:.2f}",
         f"{med['import'] + med['normal_run']:.2f}"),
    ]
    write_report("containerd_start", results, table, ROOT / "docs" / "benchmarks")


if __name__ == "__main__":
    main()
