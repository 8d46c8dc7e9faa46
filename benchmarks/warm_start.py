"""A warm `imagestream run` to its first output, and the attach of an image the node already knows.

    python -m benchmarks.warm_start [--runs 5] [--port-base 24000] [--out docs/benchmarks] [--against CHECKOUT]

On a private stack with the Debian + python3 image pushed and run once (so its
chunks are on the node and its index known to the node's FUSE client), times
`imagestream run IMAGE -- python3 -c 'print(1)'` from start to its first line
of output, `runs` times, and the attach of the known image (or, where the node
has no shared FUSE client, `imagestream mount`'s own mount time). With
`--against`, the same runs of another checkout's CLI (its services/ folder on
PYTHONPATH, e.g. an earlier commit's), one after the other with this one's, so
both see the same load. Writes OUT/warm_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import CACHE, ROOT, cli, private_stack, write_report

IMAGE = "bench/warm"


def first_output(*command: str, env: dict[str, str] | None = None) -> float:
    """Seconds from starting `command` to its first line of output (it must be '1')."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    seconds = time.perf_counter() - started
    _, err = proc.communicate(timeout=120)
    if line.strip() != "1" or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} printed {line!r}, exited {proc.returncode}: {err}")
    return seconds


def attach_seconds(runs: int) -> list[float]:
    """Attach (and detach) the known image through the node's FUSE client; [] where there is none."""
    try:
        from fuse_client import attach
    except ImportError:
        return []
    samples = []
    for i in range(runs):
        started = time.perf_counter()
        attached = attach.attach(IMAGE, f"bench:{i}")
        samples.append(time.perf_counter() - started)
        attach.detach(attached.lease)
    return samples


def mount_seconds(runs: int) -> list[float]:
    """`imagestream mount` of the known image, from the command's start to its return."""
    samples = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(runs):
            started = time.perf_counter()
            cli("mount", "--no-download", IMAGE, d)
            samples.append(time.perf_counter() - started)
            cli("umount", d)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port-base", type=int, default=24000)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--against", type=pathlib.Path, help="another checkout whose CLI runs beside this one's")
    args = parser.parse_args()
    from imagestream_dev import imagebuild

    layout = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    with private_stack(args.port_base):
        cli("push", "--quiet", str(layout), IMAGE)
        command = ["imagestream", "run", IMAGE, "--", "python3", "-c", "print(1)"]
        other = None
        if args.against:
            other = {**os.environ, "PYTHONPATH": str(args.against.absolute() / "services")}
            other_command = [sys.executable, "-m", "imagestream_cli", *command[1:]]
            first_output(*other_command, env=other)
        first_output(*command)  # the first run: chunks to the node, index to the FUSE client, a profile recorded
        time.sleep(2)  # let the first run's background work (download, profile upload) finish
        runs, against = [], []
        for _ in range(args.runs):
            runs.append(first_output(*command))
            if other is not None:
                against.append(first_output(*other_command, env=other))
        attaches = attach_seconds(args.runs)
        mounts = mount_seconds(args.runs)
    results = {
        "command": " ".join(command),
        "run_first_output_s": {"median": statistics.median(runs), "samples": runs},
        "attach_known_image_s": {"median": statistics.median(attaches), "samples": attaches} if attaches else None,
        "mount_command_s": {"median": statistics.median(mounts), "samples": mounts},
        "against": {"checkout": str(args.against), "median": statistics.median(against), "samples": against}
        if against else None,
    }
    table = [("measure", "median", "samples"),
             ("`imagestream run` to first output (warm)", f"{results['run_first_output_s']['median']:.3f} s",
              ", ".join(f"{s:.3f}" for s in runs)),
             ("`imagestream mount` command (known image)", f"{results['mount_command_s']['median']:.3f} s",
              ", ".join(f"{s:.3f}" for s in mounts))]
    if against:
        table.append((f"`imagestream run` of {args.against} (same runs, interleaved)",
                      f"{statistics.median(against):.3f} s", ", ".join(f"{s:.3f}" for s in against)))
    if attaches:
        table.append(("attach of a known image (RPC)", f"{statistics.median(attaches) * 1000:.1f} ms",
                      ", ".join(f"{s * 1000:.1f}" for s in attaches)))
    write_report("warm_start", results, table, args.out)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
