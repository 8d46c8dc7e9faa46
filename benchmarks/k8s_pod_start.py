"""Pod start on a real Kubernetes node: `kubectl apply` to the pod's first line of output, the image streamed
vs the same image pulled normally from the cluster's registry.

    python -m benchmarks.k8s_pod_start [--runs 5] [--out docs/benchmarks]

Needs root and what the cluster tier needs (docs/kubernetes.md): starts the repository's one-node cluster
(scripts/cluster, built once and cached), builds and pushes imagestream's images, applies the dev overlay,
and pushes the Debian + python3 image twice: to the regional store (streamed) and to the registry (normal).
The image's first streamed run, which records its startup profile, is not timed. Then each run starts
from a cold node both ways (every earlier pod's containers removed and every name of the image forgotten,
so that no snapshot of its layer is left on the node; checked before each pod):

  streamed  the node agent's pod replaced with its disk cache removed, Redis flushed and the zonal cache
            replaced (only the regional store keeps the image and its profile); then a pod with
            runtimeClassName imagestream; its layer blob must not reach the node
  normal    a pod with the default runtime: containerd pulls the layer from the registry and unpacks it
            (overlayfs); the layer blob must have been fetched

The two alternate, so both see the same load. The pod runs python3 importing json, sqlite3 and hashlib
and printing one line; the time is read from the pod's log file on the node. Writes
OUT/k8s_pod_start.{json,md}. Leaves the cluster running (scripts/cluster/down stops it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

from benchmarks.harness import CACHE, ROOT, write_report

PROGRAM = ("import json, sqlite3, hashlib; "
           "print(json.dumps({'sqlite': sqlite3.sqlite_version, 'h': hashlib.sha256(b'x').hexdigest()[:8]}), flush=True)")
IMAGE = "bench/debian-python:k8s"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def profile_chunks() -> int:
    """How many chunks the node cache fetched ahead from the image's startup profile in its newest download."""
    from imagestream_dev import cluster

    text = cluster.kubectl("logs", "-n", "imagestream-node", cluster.node_agent_pod(), "-c", "node-cache").stdout
    found = re.findall(r"download of .*: \d+ chunks, \d+ local, (\d+) first from the profile", text)
    return int(found[-1]) if found else 0


def cold_check(refs: dict[str, str]) -> None:
    """Neither way of the image is on the node: no layer blob, no snapshot of the layer in either snapshotter
    (a pull that finds its layer's snapshot fetches nothing)."""
    from imagestream_dev import cluster

    held = cluster.content_digests()
    if refs["normal_layer"] in held:
        raise SystemExit(f"the node still holds the layer blob {refs['normal_layer']}: not a cold node")
    for snapshotter in ("overlayfs", "imagestream"):
        layers = cluster.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.split("\n")[1:]
        if any(line.split()[0] == refs["chain_id"] for line in layers if line.strip()):
            raise SystemExit(f"the node's {snapshotter} snapshotter still has the layer {refs['chain_id']}: not a cold node")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.k8s_pod_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="cold starts each way (default 5)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--screenshot", type=pathlib.Path, default=ROOT / "docs" / "images" / "k8s-cold-start-trace.png",
                        help="PNG of the tracing UI (Zipkin) showing the first streamed pod's cold start (needs chromium)")
    args = parser.parse_args(argv)
    from imagestream_dev import cluster, imagebuild

    timings: dict[str, float] = {}
    cluster.deploy(timings)
    refs = cluster.push_both_ways(imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci"), IMAGE)
    command = ["python3", "-c", PROGRAM]
    # The image's first run records its startup profile (IMAGESTREAM_PROFILE=first), which every later cold
    # start on any node fetches ahead: one run, not timed, as the image's first run anywhere would be.
    cluster.delete_pods("bench-streamed", "bench-normal")
    cluster.run_pod("bench-streamed", refs["streamed"], True, command)
    samples: dict[str, list[float]] = {"streamed": [], "normal": []}
    fetched: list[float] = []
    profiled: list[int] = []
    results_trace: dict = {}
    blocking = 'imagestream_node_upstream_fetches_total{kind="blocking"}'
    for run in range(1, args.runs + 1):
        cluster.delete_pods("bench-streamed", "bench-normal")
        cluster.forget_image(refs["streamed"], refs["normal"], config=refs["config"])
        cluster.cold_node(log)
        cold_check(refs)
        since_ms = int(time.time() * 1000)
        seconds, line = cluster.run_pod("bench-streamed", refs["streamed"], True, command)
        if "sqlite" not in line:
            raise SystemExit(f"the streamed pod printed {line!r}")
        samples["streamed"].append(round(seconds, 3))
        fetched.append(cluster.metrics(9463).get(blocking, 0.0))
        profiled.append(profile_chunks())
        if run == 1 and args.screenshot:
            time.sleep(10)  # the services export their spans in batches
            trace = cluster.cold_start_trace(since_ms)
            cluster.screenshot_trace(trace["id"], args.screenshot)
            log(f"trace {trace['id']} ({trace['spans']} spans: {', '.join(trace['services'])}) -> {args.screenshot}")
            results_trace = trace
        if refs["normal_layer"] in cluster.content_digests():
            raise SystemExit("the streamed pod's start fetched the image's layer blob")
        cluster.delete_pods("bench-streamed")
        cluster.forget_image(refs["streamed"], refs["normal"], config=refs["config"])
        cold_check(refs)
        seconds, line = cluster.run_pod("bench-normal", refs["normal"], False, command)
        if "sqlite" not in line:
            raise SystemExit(f"the normal pod printed {line!r}")
        if refs["normal_layer"] not in cluster.content_digests():  # else it started from a layer left unpacked
            raise SystemExit("the normal pod started without its layer blob being fetched")
        samples["normal"].append(round(seconds, 3))
        log(f"run {run}/{args.runs}: streamed {samples['streamed'][-1]:.2f} s ({fetched[-1]:.0f} chunks fetched on "
            f"demand, {profiled[-1]} ahead from the profile), normal {samples['normal'][-1]:.2f} s "
            f"(load average {os.getloadavg()[0]:.1f})")
    cluster.delete_pods("bench-normal")
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["streamed"] / med["normal"]
    results = {"runs": args.runs, "samples": samples, "medians": med, "ratio": round(ratio, 3),
               "streamed_chunks_fetched_on_demand": fetched, "streamed_chunks_ahead_from_profile": profiled,
               "load_average_1m_at_end": round(os.getloadavg()[0], 1), "setup_phases_s": timings,
               "image": refs, "trace": results_trace}
    table = [
        ("image", "`kubectl apply` to first output, median (s)", "runs (s)", "vs normal pull"),
        ("streamed (runtimeClassName: imagestream)", f"{med['streamed']:.2f}",
         ", ".join(f"{x:.2f}" for x in samples["streamed"]), f"{ratio:.2f}x"),
        ("pulled normally from the cluster's registry", f"{med['normal']:.2f}",
         ", ".join(f"{x:.2f}" for x in samples["normal"]), "1.00x"),
    ]
    write_report("k8s_pod_start", results, table, args.out)


if __name__ == "__main__":
    main()
