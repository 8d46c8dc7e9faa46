"""A warm `imagestream run` to its first output, and the attach of an image the node already knows.

    python -m benchmarks.warm_start [--runs 5] [--port-base 24000] [--out docs/benchmarks] [--against CHECKOUT]

On a private stack with the Debian + python3 image pushed and run once (so its
chunks are on the node and its index known to the node's FUSE client), times
`imagestream run IMAGE -- python3 -c 'print(1)'` from start to its first line
of output, `runs` times, and the attach of the known image (or, where the node
has no shared FUSE client, `imagestream mount`'s own mount time). Where the
time goes: the interpreter with the modules a start imports (beside a bare
`python3 -c pass`), and `runc run` of the same container config straight on the
attached image's directory (no CLI, no overlay): the runtime and python3. With
`--against`, the same runs of another checkout's CLI (its services/ folder on
PYTHONPATH, e.g. an earlier commit's), one after the other with this one's, so
both see the same load. Writes OUT/warm_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import CACHE, ROOT, cli, imagestream_command, private_stack, write_report

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


def imports_seconds(runs: int) -> tuple[list[float], list[float]]:
    """The CLI's interpreter with what a plain `run` imports, and a bare interpreter, start to exit."""
    start_path = "import imagestream_cli.entry, imagestream_cli.sandbox, fuse_client.availability, fuse_client.held"
    timed_runs = ([], [])
    for _ in range(runs):
        for samples, code in zip(timed_runs, (start_path, "pass")):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            samples.append(time.perf_counter() - started)
    return timed_runs


def runtime_seconds(runs: int) -> list[float]:
    """`runc run` of the container config `imagestream run` writes, with the attached image's directory as
    a read-only root (no CLI, no overlay), to python3's first output: what runc and python3 take."""
    from fuse_client import attach
    from imagestream_cli import sandbox

    attached = attach.attach(IMAGE, "bench:runtime")
    samples = []
    try:
        with tempfile.TemporaryDirectory() as d:
            bundle = pathlib.Path(d)
            env = sandbox.container_env(attached.config.get("Env") or [], [])
            spec = sandbox.oci_config(pathlib.Path(attached.path), ["python3", "-c", "print(1)"], env,
                                      cgroup="/imagestream/bench-runtime")
            spec["root"]["readonly"] = True
            (bundle / "config.json").write_text(json.dumps(spec))
            for i in range(runs):
                samples.append(first_output(shutil.which("runc") or "runc", "--root", str(bundle / "state"), "run",
                                            "--bundle", str(bundle), f"bench-runtime-{i}"))
    finally:
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
        command = [imagestream_command(), "run", IMAGE, "--", "python3", "-c", "print(1)"]
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
        start_imports, bare_python = imports_seconds(args.runs)
        runtime = runtime_seconds(args.runs)
    results = {
        "command": " ".join(command),
        "run_first_output_s": {"median": statistics.median(runs), "samples": runs},
        "attach_known_image_s": {"median": statistics.median(attaches), "samples": attaches} if attaches else None,
        "mount_command_s": {"median": statistics.median(mounts), "samples": mounts},
        "start_path_imports_s": {"median": statistics.median(start_imports), "samples": start_imports},
        "bare_python_s": {"median": statistics.median(bare_python), "samples": bare_python},
        "runc_on_image_s": {"median": statistics.median(runtime), "samples": runtime},
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
    for label, samples in (("where it goes: the CLI's interpreter and the start path's imports", start_imports),
                           ("  for scale: `python3 -c pass` (this interpreter)", bare_python),
                           ("where it goes: `runc run` on the attached image to python3's output (no CLI, no overlay)",
                            runtime)):
        table.append((label, f"{statistics.median(samples) * 1000:.0f} ms", ", ".join(f"{s * 1000:.0f}" for s in samples)))
    write_report("warm_start", results, table, args.out)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
