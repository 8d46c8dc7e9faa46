"""Cold start against a full pull, across image sizes, tiers and nodes, over an emulated regional link.

    python -m benchmarks                 # everything: about an hour; writes docs/benchmarks/bench.*
    python -m benchmarks --quick --out /tmp/b   # tiny image, one run, fewer cells: a couple of minutes

Starts a private stack (own home, ports from --port-base), puts the regional
store behind an emulated link (network namespace + veth + tbf for bandwidth,
benchmarks.linkproxy for round-trip time), pushes a base Debian+python3 image
and a large one (the same plus --filler-mb of data the command never reads), and
runs every part:

  cold start   full pull / streaming cold / streaming + startup profile / warm,
               python3 importing modules and an HTTP server answering, both
               images, default link (and the slow link: fewer cells)
  bytes        what the program read and what crossed the link before its output
  tiers        chunk fetch p50/p99 and throughput: node memory, node disk,
               zonal, regional
  fanout       N cold nodes behind one zonal cache (regional reads per unique
               chunk, start time)
  warm reads   4 KiB sequential and random reads, mount vs local disk
  baselines    what users would run instead, through the same link: containerd
               pull + run, stargz (eStargz, optimized), Nydus, SOCI, each on a
               fresh node; imagestream through containerd and `imagestream run`;
               and N cold nodes of each at once (benchmarks.baselines)

Writes OUT/bench.json, OUT/bench.md and PNG charts. See docs/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback

from benchmarks import baselines, charts, coldstart, fanout, tiers, warmreads
from benchmarks.harness import CACHE, ROOT, machine, private_stack
from benchmarks.link import DEFAULT, FAST, SLOW, TBF_BURST, TBF_LATENCY, Link, LinkProfile
from benchmarks.setup import PROGRAM, Image, Setup, debian_image, debian_large_image, large_command, log, tiny_image

PARTS = ("coldstart", "slow", "bytes", "fanout", "tiers", "warm", "baselines", "bgcap")
DEFAULT_PARTS = PARTS[:-1]  # bgcap is an experiment, run on request


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one run, a tiny python3 image (and it + 8 MiB), a fast link, fewer cells, fan-out N=2 (tests)")
    p.add_argument("--runs", type=int, default=None, help="repetitions of each cold start cell (default 3; quick 1)")
    p.add_argument("--slow-runs", type=int, default=None, help="repetitions on the slow link (default 2)")
    p.add_argument("--filler-mb", type=int, default=None, help="extra MiB in the large image (default 800; quick 8)")
    p.add_argument("--fanout", default=None, help="comma-separated N for the fan-out (default 1,2,4,8; quick 2)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all but bgcap, an experiment)")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="folder for bench.json, bench.md and the PNGs (default docs/benchmarks; required with --quick)")
    p.add_argument("--port-base", type=int, default=21000,
                   help="ports of the private stack (see private_env); the peers' registry listens on PORT_BASE + 40")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated baselines of {','.join(pk.key for pk in baselines.PEERS)} "
                        "(default: all; quick: containerd,estargz)")
    p.add_argument("--images", default=None,
                   help="images of the baselines part: base (Debian + python3) and large (a JDK and Python's "
                        "scientific stack, imagebuild.LARGE_PACKAGES, run with LARGE_COMMAND) (default base,large; quick: base)")
    p.add_argument("--large-runs", type=int, default=None,
                   help="repetitions of each baselines cell of the large image (default: --runs)")
    p.add_argument("--report-only", type=pathlib.Path, default=None, metavar="BENCH_JSON",
                   help="measure nothing: write the Markdown and charts again from an earlier bench.json")
    p.add_argument("--add-baselines", type=pathlib.Path, default=None, metavar="BENCH_JSON",
                   help="with --report-only: add the baselines images of another run's bench.json (e.g. the large "
                        "image measured in a run of its own), each marked with when and how loaded that run was")
    p.add_argument("--use-running-stack", action="store_true",
                   help="use the stack the IMAGESTREAM_* variables point at instead of starting one (tests)")
    a = p.parse_args(argv)
    if a.quick and a.out is None:
        p.error("--quick needs --out (quick results must not replace the published ones)")
    a.out = a.out or ROOT / "docs" / "benchmarks"
    a.runs = a.runs or (1 if a.quick else 3)
    a.slow_runs = a.slow_runs or (1 if a.quick else 2)
    a.filler_mb = a.filler_mb if a.filler_mb is not None else (8 if a.quick else 800)
    a.fanout = [int(n) for n in (a.fanout or ("2" if a.quick else "1,2,4,8")).split(",")]  # 0: no baselines fan-out
    a.parts = [x for x in a.parts.split(",") if x]
    a.peers = [x for x in (a.peers or ("containerd,estargz" if a.quick else ",".join(pk.key for pk in baselines.PEERS))).split(",") if x]
    if set(a.peers) - {pk.key for pk in baselines.PEERS}:
        p.error(f"unknown peers {sorted(set(a.peers) - {pk.key for pk in baselines.PEERS})}")
    a.images = [x for x in (a.images or ("base" if a.quick else "base,large")).split(",") if x]
    if set(a.images) - {"base", "large"} or not a.images:
        p.error(f"--images: base and/or large (got {','.join(a.images)})")
    a.large_runs = a.large_runs or a.runs
    unknown = set(a.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if a.quick:
        a.parts = [x for x in a.parts if x != "slow"]
    return a


def loadavg() -> list[float]:
    return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]


LOAD_EVERY_S = 30


@contextlib.contextmanager
def load_sampler(r: dict):  # type: ignore[no-untyped-def]
    """[seconds since start, 1-minute load average] every LOAD_EVERY_S into r["load_samples"] while the run goes."""
    samples = r.setdefault("load_samples", [])
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.wait(0 if not samples else LOAD_EVERY_S):
            samples.append([round(time.monotonic() - started), loadavg()[0]])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def link_dict(profile: LinkProfile) -> dict:
    return {"name": profile.name, "rate_mbit": profile.rate_mbit, "rtt_ms": profile.rtt_ms,
            "tbf_burst": TBF_BURST, "tbf_latency": TBF_LATENCY}


@contextlib.contextmanager
def stack(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.use_running_stack:
        yield {k: v for k, v in os.environ.items() if k.startswith("IMAGESTREAM_")}
        return
    os.environ.setdefault("IMAGESTREAM_REDIS_MAXMEMORY", "2GiB")  # a zonal cache that can hold the large image
    with private_stack(args.port_base) as env:
        yield {**{k: v for k, v in os.environ.items() if k.startswith("IMAGESTREAM_")}, **env}


def run(args: argparse.Namespace) -> dict:
    from imagestream import config

    default = FAST if args.quick else DEFAULT
    r: dict = {"benchmark": "imagestream cold start vs full pull", "quick": args.quick, "machine": machine(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_before": loadavg(),
               "program": PROGRAM, "parts": args.parts,
               "settings": {"runs": args.runs, "large_runs": args.large_runs, "images": args.images, "slow_runs": args.slow_runs, "filler_mb": args.filler_mb,
                            "fanout_n": args.fanout, "default_link": link_dict(default), "slow_link": link_dict(SLOW)}}
    with load_sampler(r), stack(args) as env, tempfile.TemporaryDirectory(prefix="imagestream-bench-work-") as td:
        workdir = pathlib.Path(td)
        r["settings"].update({k: config.get(k) for k in ("node_memory_bytes", "node_disk_bytes", "redis_maxmemory",
                                                         "chunk_size", "fetch_timeout")})
        with Link(env["IMAGESTREAM_CHUNK_STORE_LISTEN"], args.port_base // 100, workdir) as link:
            log(f"link: netns {link.netns}, veth {link.host_if} {link.host_ip} <-> {link.ns_if} {link.address}, "
                f"regional store {link.upstream}")
            setup = Setup(env, workdir, link)
            images = []
            try:
                log("images: build (cached), push, startup profile")
                images = [setup.prepare_image("base", 0, tiny=args.quick)]
                if set(args.parts) & {"coldstart", "slow", "bytes", "warm", "bgcap"}:  # the parts that use it
                    images.append(setup.prepare_image("large", args.filler_mb, tiny=args.quick))
                r["images"] = {im.label: im.describe() for im in images}
                setup.route_zone_through_link()
                r["settings"]["link_address"] = link.address
                parts(args, setup, images, default, r)
            finally:
                with contextlib.suppress(Exception):
                    setup.route_zone_direct()
                if args.use_running_stack:
                    setup.remove_images(images)
                setup.close()
    r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    r["load_after"] = loadavg()
    return r


def parts(args: argparse.Namespace, setup: Setup, images: list, default: LinkProfile, r: dict) -> None:
    """Each part in turn; one that fails is recorded in r["errors"] and the others still run."""
    base, large = images[0], images[-1]

    def cold_start() -> None:
        setup.shape(default)
        log(f"cold start, link {default.describe()}: {setup.link.qdiscs()}")
        if args.quick:  # every kind of cell once, in little time
            plan = {"base": {"python": coldstart.MODES, "http": ("stream_cold", "warm")},
                    "large": {"python": ("full_pull", "stream_cold")}}
        else:
            plan = {im.label: {c: coldstart.MODES for c in coldstart.COMMANDS} for im in images}
        cells = coldstart.measure(setup, images, args.runs, plan)
        r.setdefault("cold_start", {})["default"] = {"link": link_dict(default), "qdiscs": setup.link.qdiscs(),
                                                     "runs": args.runs, "by_image": cells}

    def bytes_() -> None:
        setup.shape(default)
        log("bytes before the first output")
        r["bytes"] = {im.label: coldstart.reads_before_output(setup, im) for im in images}

    def slow() -> None:
        setup.shape(SLOW)
        log(f"cold start, link {SLOW.describe()}: {setup.link.qdiscs()}")
        cells = coldstart.measure(setup, images, args.slow_runs,
                                  {im.label: {"python": ("full_pull", "stream_cold", "stream_profile")} for im in images})
        r.setdefault("cold_start", {})["slow"] = {"link": link_dict(SLOW), "qdiscs": setup.link.qdiscs(),
                                                  "runs": args.slow_runs, "by_image": cells}

    def fan_out() -> None:
        setup.shape(default)
        log(f"fan-out, link {default.describe()}")
        r["fanout"] = fanout.measure(setup, base, args.fanout)
        r["fanout"]["link"] = link_dict(default)

    def tier_latency() -> None:
        log("tier latency")
        r["tiers"] = tiers.measure(setup, base, sample_chunks=24 if args.quick else 200)

    def warm() -> None:
        log("warm reads")
        r["warm_reads"] = warmreads.measure(setup, large, runs=args.runs, budget_mb=4 if args.quick else 256,
                                            random_reads_n=200 if args.quick else 4000)

    def bgcap() -> None:
        setup.shape(default)
        cap = int(default.rate_mbit * 1e6 / 8 / 4)
        log(f"experiment: background download capped at {cap / 1e6:.1f} MB/s (a quarter of the link)")
        cells = coldstart.measure(setup, images, args.runs,
                                  {im.label: {"python": ("full_pull", "stream_cold", coldstart.BGCAP)} for im in images},
                                  bg_cap=cap)
        r["bgcap"] = {"link": link_dict(default), "cap_bytes_per_s": cap, "runs": args.runs, "by_image": cells}

    def baseline() -> None:
        setup.shape(default)
        log(f"baselines, link {default.describe()}: peers {','.join(args.peers)}")
        cells = []
        if "base" in args.images:
            cells.append(baselines.Cell("base", tiny_image(0) if args.quick else debian_image(0), args.runs, image=base))
        if "large" in args.images:
            # the real large image, pushed when its turn comes, after the base image and the fan-out (the cold start
            # parts use the filler image under "large")
            command, expect = large_command()
            source = debian_large_image()

            def make() -> Image:
                image = setup.prepare_image("debian-large", 0, source=source, command=command, expect=expect)
                r.setdefault("images", {})[image.label] = image.describe()
                return image

            cells.append(baselines.Cell("debian-large", source, args.large_runs, make=make, fallback=False))
        def progress(b: dict) -> None:  # what is measured so far survives an interruption (--report-only)
            r["baselines"] = {**b, "link": link_dict(default)}
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench.partial.json").write_text(json.dumps(r, indent=2) + "\n")

        progress(baselines.measure(setup, cells, args.port_base + 40, args.peers, fanout_n=max(args.fanout),
                                   progress=progress))

    for name, fn in (("bgcap", bgcap), ("coldstart", cold_start), ("bytes", bytes_), ("slow", slow), ("fanout", fan_out),
                     ("tiers", tier_latency), ("warm", warm), ("baselines", baseline)):
        if name not in args.parts:
            continue
        started = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report it, go on with the other parts
            traceback.print_exc()
            r.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                setup.empty_caches()
        r.setdefault("part_seconds", {})[name] = round(time.monotonic() - started, 1)
        r.setdefault("load_after_part", {})[name] = loadavg()  # how busy the machine was (loaded machines stretch seconds)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.partial.json").write_text(json.dumps(r, indent=2) + "\n")  # survives a crash
    r["targets"] = targets(r)


# -- targets --------------------------------------------------------------------------

NOTES = {
    "vs_containerd": (
        "A cold start on imagestream is a chain of dependent chunk fetches (see the blocking fetches), each a "
        "round trip over the link, while containerd's pull is a few large GETs at the link's full rate followed by "
        "a local unpack. On a small image the unpack is short and the chain of round trips is what is left."),
    "vs_containerd:profile": (
        "With the startup profile the start is bound by the bytes the profile's chunks put on the link (its "
        "chunks come in one batch right after the mount), then by the program's own run; containerd's pull of a "
        "large image is bound by the same link, so the ratio is roughly profile bytes / image bytes plus fixed costs."),
    "vs_peer": (
        "Without a profile (an image's first start anywhere) a cold start is a chain of dependent chunk fetches, "
        "each a round trip over the link through node cache, zonal cache and regional store, one after another "
        "as the program's imports go. The best peer here is usually optimized eStargz, whose image was rebuilt by "
        "`ctr-remote image optimize` running this very program: it fetches the program's files in a few "
        "prefetched ranges, which is what imagestream's startup profile does (the profile rows); against the "
        "peers without a prefetch list (plain eStargz, Nydus, SOCI) see the table."),
    "vs_peer:profile": (
        "With the startup profile the start is bound by bytes over the link: the profile names whole 1 MiB "
        "chunks, and the small files a program opens are packed with their neighbours in tree order, most of "
        "which it never reads (see the bytes part of `python -m benchmarks`), so more bytes cross the link than "
        "optimized eStargz's prefetch of just the files its workload opened. Closing it: repack the profile's "
        "small files together when the profile is recorded, as `ctr-remote image optimize` reorders an image."),
    "vs_peer_fanout": (
        "The nodes share the zonal cache, which coalesces their fetches (one copy crosses the link), but each "
        "node still makes its own chain of dependent fetches, and the 8 nodes' node caches, FUSE clients (and "
        "snapshotters) are Python processes serving their reads on the same 2 cores."),
    "cold_vs_pull": (
        "Without a startup profile a cold start is a chain of blocking fetches: each chunk the program reads "
        "first is a round trip node -> zonal cache -> region, one after another as the imports go. The "
        "background download does not stand in their way (it holds back until the node has been quiet for "
        "IMAGESTREAM_NODE_BACKGROUND_QUIET), so the chain is what is left. Closing it: the startup profile "
        "fetches those chunks in parallel at mount (rows 'streaming + profile')."),
    "flat": (
        "The large image differs from the base only by data the command never reads and a larger index; a "
        "gap here comes from the index fetch at mount and from the blocking fetches' variance. Closing it: "
        "the startup profile (rows 'streaming + profile')."),
    "bytes": (
        "Before the first output the node moves the chunks the program reads, the FUSE client's readahead "
        "(up to 8 chunks after a read at the start of a file) and, once the node has been quiet for "
        "IMAGESTREAM_NODE_BACKGROUND_QUIET, the background download. Closing it: a longer quiet period or "
        "less readahead, at the cost of a later complete download or slower sequential reads."),
    "fanout": (
        "The zonal cache coalesces requests for a chunk from the first request until the chunk is in Redis, "
        "for single gets and batches alike (CoalescingStore over the read-through). What is left are reads "
        "Cassandra counts that are not chunk fetches of this image, and chunks Redis evicted; see the "
        "regional reads at start and in total."),
    "warm_seq": (
        "With the page cache dropped, each 1 MiB chunk is asked of the node cache, which names its file on "
        "the node's disk; the FUSE client reads it, checks its SHA-256 and decompresses it in worker "
        "threads, and each FUSE request (up to 1 MiB) crosses the kernel and Python's event loop, on the "
        "same 2 cores as the reader; local disk is one read into the page cache. Closing it: hand the kernel "
        "a verified, uncompressed copy of node-local files with FUSE passthrough (Linux 6.9+; pyfuse3 3.5 "
        "does not expose it), or a compiled read path."),
}


def _note(key: str) -> str:
    """Why a target is missed: by its kind, with the startup profile or without ("vs_peer:imagestream_profile:base"
    is a "vs_peer:profile")."""
    kind, _, rest = key.partition(":")
    profiled = rest.split(":")[0].endswith("_profile")
    return NOTES.get(f"{kind}:profile", NOTES.get(kind, "")) if profiled else NOTES.get(kind, "")


def _cell(r: dict, profile: str, image: str, command: str, mode: str) -> float | None:
    try:
        return r["cold_start"][profile]["by_image"][image][command][mode]["median"]
    except KeyError:
        return None


def targets(r: dict) -> list[dict]:
    out = []

    def add(key: str, what: str, value: float | None, limit: float, fmt: str, higher_is_better: bool = False) -> None:
        if value is None:
            return
        met = value >= limit if higher_is_better else value <= limit
        out.append({"key": key, "name": key, "target": what, "measured": value, "limit": limit, "met": met,
                    "shown": fmt.format(value), "limit_shown": (">= " if higher_is_better else "<= ") + fmt.format(limit),
                    "note": "" if met else _note(key)})

    for mode, how in (("stream_cold", "streaming cold"), ("stream_profile", "streaming + profile")):
        for command in ("python", "http"):
            cold, pull = _cell(r, "default", "large", command, mode), _cell(r, "default", "large", command, "full_pull")
            if cold and pull:
                add(f"cold_vs_pull:{command}:{mode}", f"{how} / full pull, large image, default link ({command})",
                    cold / pull, 0.10, "{:.3f}")
    for mode, how in (("stream_cold", "streaming cold"), ("stream_profile", "streaming + profile")):
        for command in ("python", "http"):
            large, base = _cell(r, "default", "large", command, mode), _cell(r, "default", "base", command, mode)
            if large and base:
                add(f"flat:{command}:{mode}", f"{how} start, large / base image ({command})", large / base, 1.3,
                    "{:.2f}")
    if "bytes" in r:
        b = r["bytes"]["large"]
        add("bytes:link", "bytes over the link before first output / image bytes, large image (incl. background)",
            b["share_link_of_compressed"], 0.10, "{:.1%}")
        add("bytes:app", "chunk bytes the program touched / image bytes, large image", b["share_chunks_of_content"],
            0.10, "{:.1%}")
    if "fanout" in r:
        top = max(r["fanout"]["by_n"], key=int)
        add("fanout", f"regional reads per unique chunk, N = {top}",
            r["fanout"]["by_n"][top]["regional_reads_per_unique_chunk"], 1.05, "{:.3f}")
    if "warm_reads" in r:
        add("warm_seq:dropped", "warm 4 KiB sequential reads, mount / local disk, page cache dropped",
            r["warm_reads"]["ratio_seq_dropped"], 0.7, "{:.2f}", higher_is_better=True)
        add("warm_seq:hot", "warm 4 KiB sequential reads, mount / local disk, page cache hot",
            r["warm_reads"]["ratio_seq_hot"], 0.5, "{:.2f}", higher_is_better=True)
    if "baselines" in r:
        b = r["baselines"]
        # the same start to first output, side by side: at most these times containerd's pull + run, and the best peer's
        vs_pull = {"base": 0.35, "debian-large": 0.1}
        for label, cells in b["by_image"].items():
            pull = cells.get("containerd", {}).get("median")
            for key in ("imagestream_containerd", "imagestream_containerd_profile", "imagestream_run",
                        "imagestream_profile"):
                if pull and key in cells and label in vs_pull:
                    add(f"vs_containerd:{key}:{label}", f"{baselines.LABELS[key]} / containerd pull + run, {label} image",
                        cells[key]["median"] / pull, vs_pull[label], "{:.2f}")
            best = baselines.best_peer(cells)
            if best:
                for key, limit in (("imagestream_containerd", 1.0), ("imagestream_containerd_profile", 0.8),
                                   ("imagestream_run", 1.0), ("imagestream_profile", 0.8)):
                    if key in cells:
                        add(f"vs_peer:{key}:{label}", f"{baselines.LABELS[key]} / best peer ({best[0]}), {label} image",
                            cells[key]["median"] / best[1], limit, "{:.2f}")
        fo = b.get("fanout")
        if fo:
            lazy = [(k, c["start_median_s"]) for k, c in fo["by_path"].items() if k in baselines.LAZY]
            if lazy:
                k, v = min(lazy, key=lambda kv: kv[1])
                for key in ("imagestream_containerd", "imagestream_containerd_profile", "imagestream_run",
                            "imagestream_profile"):
                    if key in fo["by_path"]:
                        add(f"vs_peer_fanout:{key}", f"{fo['n']} cold nodes at once, {baselines.LABELS[key]} / best peer "
                            f"({k}), median start", fo["by_path"][key]["start_median_s"] / v, 0.5, "{:.2f}")
    return out


# -- report -----------------------------------------------------------------------------

def _table(rows: list[list[str]]) -> list[str]:
    header, *body = rows
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(x) + " |" for x in body)]


def stopped(r: dict) -> str:
    """A run stopped before its end (its results as written when each step completed): how far it went."""
    last = r.get("load_samples", [[0]])[-1][0]
    return f"(stopped; results as written as each step completed, up to about {last // 60} min after the start)"


def markdown(r: dict, pngs: list[str]) -> str:
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    m = r["machine"]
    after = r.get("load_after", r["load_before"])
    loads = [r["load_before"][0], *(v[0] for v in r.get("load_after_part", {}).values()), after[0]]
    sampled = [x[1] for x in r.get("load_samples", [])]
    load = (f"1-minute load average {r['load_before'][0]:.1f} before" + (f", {after[0]:.1f} after" if "load_after" in r else "")
            + (f", {min(loads):.1f}–{max(loads):.1f} between parts" if r.get("load_after_part") else "")
            + (f", {min(sampled):.1f}–{max(sampled):.1f} (median {statistics.median(sampled):.1f}) sampled every "
               f"{LOAD_EVERY_S} s during the run" if sampled else "")
            + (f"; {r['load_note']}" if r.get("load_note") else ""))
    L = [f"# imagestream benchmark{' (quick mode)' if r['quick'] else ''}", "",
         f"Measured {r['started']} – {r.get('finished') or stopped(r)} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
         f"Linux {m['kernel']}, Python {m['python']}; {load}. "
         "Medians of the runs in `bench.json`.", ""]
    s = r["settings"]
    L += [f"Links (tbf burst {s['default_link']['tbf_burst']}, queue {s['default_link']['tbf_latency']}; RTT from "
          f"`benchmarks/linkproxy.py`): **default** {s['default_link']['rate_mbit']:g} Mbit/s, "
          f"{s['default_link']['rtt_ms']:g} ms RTT; **slow** {s['slow_link']['rate_mbit']:g} Mbit/s, "
          f"{s['slow_link']['rtt_ms']:g} ms RTT. Node memory {s['node_memory_bytes']}, Redis maxmemory "
          f"{s['redis_maxmemory']}, chunk size {s['chunk_size']}.", ""]
    L += ["Images:", ""]
    L += _table([["image", "files' bytes", "chunks", "stored (compressed)", "index (compressed)"]] + [
        [k, mb(v["content_bytes"]), str(v["chunks"]), mb(v["compressed_bytes"]), f"{v['index_bytes'] / 1e3:,.0f} kB"]
        for k, v in r["images"].items()])
    L += ["", f"The python program: `python3 -u -c \"{r['program']}\"`.", ""]
    for part, error in r.get("errors", {}).items():
        L += [f"**Part `{part}` failed:** `{error}`", ""]
    if r.get("targets"):
        L += ["## Targets", ""]
        L += _table([["target", "measured", "limit", "met"]] + [
            [t["target"], t["shown"], t["limit_shown"],
             "yes" if t["met"] else "**no**"] for t in r["targets"]])
        missed = [t for t in r["targets"] if not t["met"]]
        if missed:
            L += ["", "Where a target is missed, why, and what would close it:", ""]
            seen = set()
            for t in missed:
                note_key = t["key"].split(":")[0]
                if note_key in seen or not t["note"]:
                    continue
                seen.add(note_key)
                L += [f"* **{t['target']}** — {t['note']}"]
        L += [""]
    for profile, cs in r.get("cold_start", {}).items():
        link = cs["link"]
        L += [f"## Cold start to first output — {profile} link ({link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT)",
              "", f"Median seconds of {cs['runs']} runs; in brackets: MB over the regional link by the first output.", ""]
        modes = [mo for mo in coldstart.MODES if any(mo in c for im in cs["by_image"].values() for c in im.values())]
        rows = [["command", "image", *[charts.MODE_LABELS[mo] for mo in modes], "cold / pull", "profile / pull"]]
        for image, cmds in cs["by_image"].items():
            for command, cells in cmds.items():
                row = [charts.COMMAND_LABELS[command], image]
                for mo in modes:
                    c = cells.get(mo)
                    row.append(f"{c['median']:.2f} s ({c['link_bytes_median'] / 1e6:.0f} MB)" if c else "–")
                pull = cells.get("full_pull", {}).get("median")
                for mo in ("stream_cold", "stream_profile"):
                    row.append(f"{cells[mo]['median'] / pull:.3f}" if pull and mo in cells else "–")
                rows.append(row)
        L += _table(rows) + [""]
        bf = [(im, c, cells["stream_cold"].get("blocking_fetches_median"), cells.get("stream_profile", {}).get("blocking_fetches_median"))
              for im, cmds in cs["by_image"].items() for c, cells in cmds.items() if "stream_cold" in cells]
        L += ["Blocking fetches (foreground chunk fetches the node made itself, not served by a batch already "
              "under way) in a cold start: " + "; ".join(
            f"{c} {im}: {a:g} cold, {b:g} with profile" if b is not None else f"{c} {im}: {a:g} cold"
            for im, c, a, b in bf if a is not None) + ".", ""]
    if "bgcap" in r:
        e = r["bgcap"]
        L += [f"## Experiment: the background download capped ({e['cap_bytes_per_s'] / 1e6:.1f} MB/s, a quarter of the "
              f"default link; IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH)", "",
              f"Python program, no startup profile, cold; median of {e['runs']} runs side by side"
              + (f"; measured in a separate run ({e['measured']})" if e.get("measured") else "") + ".", ""]
        rows = [["image", "full pull", "streaming cold", "streaming cold, background capped", "capped / pull",
                 "MB over the link by first output (uncapped / capped)"]]
        for image, cmds in e["by_image"].items():
            c = cmds["python"]
            pull = c.get("full_pull", {}).get("median")
            rows.append([image, f"{pull:.2f} s" if pull else "–", f"{c['stream_cold']['median']:.2f} s",
                         f"{c[coldstart.BGCAP]['median']:.2f} s",
                         f"{c[coldstart.BGCAP]['median'] / pull:.3f}" if pull else "–",
                         f"{c['stream_cold']['link_bytes_median'] / 1e6:.0f} / {c[coldstart.BGCAP]['link_bytes_median'] / 1e6:.0f}"])
        L += _table(rows) + [""]
    for p in pngs:
        L += [f"![{p}]({p})", ""]
    if "baselines" in r:
        L += baselines_markdown(r["baselines"])
    if "bytes" in r:
        L += ["## Bytes before the first output (python program, cold, default link)", ""]
        rows = [["image", "FUSE reads", "files", "bytes read", "chunks touched", "chunk bytes touched",
                 "share of image (chunks)", "over the link by first output", "share of stored image"]]
        for im, b in r["bytes"].items():
            rows.append([im, str(b["reads"]), str(b["files"]), mb(b["bytes_read"]), str(b["chunks_touched"]),
                         mb(b["chunk_bytes_touched"]), f"{b['share_chunks_of_content']:.1%}",
                         mb(b["link_bytes_at_first_output"]), f"{b['share_link_of_compressed']:.1%}"])
        L += _table(rows)
        L += ["", "FUSE reads are what the kernel asked the mount for (its readahead included), recorded by "
              "IMAGESTREAM_RECORD_READS; chunk bytes are the uncompressed sizes of the distinct chunks those reads "
              "touched, against the image's file bytes. Over the link: bytes the regional store sent through the "
              "link proxy until the first output (the background download included), against the stored image.", ""]
    if "tiers" in r:
        t = r["tiers"]
        L += [f"## Tier latency ({t['sample_chunks']} chunks of the {t['image']} image, one at a time; "
              "throughput with 16 in flight)", ""]
        rows = [["tier", "p50", "p99", "MB/s", "chunks/s", "mean chunk"]]
        for k, label in charts.TIER_LABELS.items():
            if k in t:
                c = t[k]
                rows.append([label, f"{c['p50_ms']:.2f} ms", f"{c['p99_ms']:.2f} ms", f"{c['throughput_mb_s']:.1f}",
                             f"{c['throughput_chunks_s']:.0f}", f"{c['mean_chunk_bytes'] / 1024:.0f} KiB"])
        L += _table(rows) + [""]
    if "fanout" in r:
        fo = r["fanout"]
        L += [f"## Fan-out: N cold nodes, one zonal cache ({fo['image']} image, {fo['unique_chunks']} unique chunks, "
              f"link {fo['link']['rate_mbit']:g} Mbit/s, {fo['link']['rtt_ms']:g} ms RTT)", ""]
        rows = [["N", "start median", "start slowest", "all chunks on all nodes", "regional reads (start / total)",
                 "regional reads per unique chunk", "link bytes per image byte"]]
        for n, c in sorted(fo["by_n"].items(), key=lambda kv: int(kv[0])):
            rows.append([n, f"{c['start_median_s']:.2f} s", f"{c['start_max_s']:.2f} s", f"{c['fetch_all_seconds']:.1f} s",
                         f"{c['regional_reads_start']} / {c['regional_reads_total']}",
                         f"{c['regional_reads_per_unique_chunk']:.3f}", f"{c['link_bytes_per_image_byte']:.3f}"])
        L += _table(rows)
        L += ["", "Regional reads are counted by Cassandra itself (reads of the chunks table in "
              "`system_views.local_read_latency`); start = N `imagestream run` at once, each on its own node cache; "
              "then every node fetches every chunk at once.", ""]
    if "warm_reads" in r:
        w = r["warm_reads"]
        L += [f"## Warm reads ({w['files']} files, {mb(w['bytes'])}, {w['block_bytes'] // 1024} KiB reads; "
              f"{w['random_reads']} random reads; every chunk on the node's disk)", ""]
        rows = [["pattern", "page cache", "mount", "local disk", "mount / disk"]]
        for kind, label in (("seq", "sequential"), ("rand", "random")):
            for cache in ("dropped", "hot"):
                rows.append([label, cache, f"{w[f'fuse_{kind}_{cache}']['median_mb_s']:.1f} MB/s",
                             f"{w[f'disk_{kind}_{cache}']['median_mb_s']:.1f} MB/s", f"{w[f'ratio_{kind}_{cache}']:.2f}"])
        L += _table(rows) + [""]
        L += ["A read that misses the kernel's page cache costs the mount a whole chunk: the FUSE client asks the "
              "node cache for the chunk, reads the file the node names (up to 1 MiB compressed), checks its SHA-256 and "
              "decompresses it, then keeps it in a 64 MiB LRU. Sequential reads pay that once per chunk and the "
              "kernel's 4 MiB readahead keeps requests large; random 4 KiB reads over 256 MB pay it for most reads "
              "(the LRU holds a quarter of the data), hence the low random figure with the page cache dropped. "
              "Smaller chunks for such files, or node-local chunks kept uncompressed and already verified, would "
              "close it.", ""]
        if not w["page_cache_droppable"]:
            L += ["(The page cache could not be dropped here: 'dropped' rows are not cold.)", ""]
    return "\n".join(L) + "\n"


def baselines_markdown(b: dict) -> list[str]:
    link = b["link"]
    L = [f"## Baselines: the same cold start on what users would run instead (link {link['rate_mbit']:g} Mbit/s, "
         f"{link['rtt_ms']:g} ms RTT)", "",
         "Median seconds from the start of the pull to the command's first output, each path on a fresh node; round "
         "trips: registry GETs (manifests and blobs) for containerd and the peers, blocking chunk fetches for "
         "imagestream.", ""]
    for label, cells in b["by_image"].items():
        info = b["images"][label]
        pull = cells.get("containerd", {}).get("median")
        best = baselines.best_peer(cells)
        L += [f"### {label} image: `{' '.join(info['command'][:3])} \"{info['command'][3]}\"`" if len(info["command"]) == 4
              else f"### {label} image: `{' '.join(info['command'])}`", "",
              f"Median of {info['runs']} run{'s' if info['runs'] > 1 else ''}"
              + (f"; {info['measured']}" if info.get("measured") else "")
              + (f"; the original image is one gzip layer of {info['orig_bytes'] / 1e6:,.1f} MB" if "orig_bytes" in info else "")
              + ".", ""]
        rows = [["path", "get ready", "run to first output", "total", "round trips", "MB over the link",
                 "/ containerd", "/ best peer"]]
        for key, c in cells.items():
            trips = (f"{c['registry_gets_median']:g} GETs" if "registry_gets_median" in c
                     else f"{c['blocking_fetches_median']:g} fetches" if "blocking_fetches_median" in c else "–")
            rows.append([b["labels"][key], f"{c['pull_s_median']:.2f} s" if "pull_s_median" in c else "–",
                         f"{c['run_s_median']:.2f} s" if "run_s_median" in c else "–", f"**{c['median']:.2f} s**", trips,
                         f"{c['link_bytes_median'] / 1e6:.1f}", f"{c['median'] / pull:.2f}" if pull else "–",
                         f"{c['median'] / best[1]:.2f}" if best else "–"])
        L += _table(rows) + [""]
        if best:
            L += [f"Best peer: {b['labels'][best[0]]}.", ""]
        skipped = {**b.get("skipped", {}), **info.get("skipped", {})}
        for key, why in skipped.items():
            L += [f"* {b['labels'][key]}: skipped ({why})"]
        if skipped:
            L += [""]
        if info.get("images_prepared_s"):
            L += ["Preparing the peers' images (once per run, not timed above): " + ", ".join(
                f"{k} {v:g} s" for k, v in info["images_prepared_s"].items()) + ".", ""]
    for label, error in b.get("errors", {}).items():
        L += [f"**The {label} image was not measured:** `{error}`", ""]
    if "fanout" in b:
        fo = b["fanout"]
        L += [f"### {fo['n']} cold nodes start the {fo.get('image', 'base')} image at once over the one link", "",
              "Each node is fresh: its own containerd and snapshotter for the peers; its own node cache, FUSE client "
              "(and, through containerd, snapshotter and containerd) for imagestream, behind the one zonal cache.", ""]
        L += _table([["path", "start median", "start slowest", "registry GETs (all nodes)", "MB over the link"]] + [
            [b["labels"][k], f"{c['start_median_s']:.2f} s", f"{c['start_max_s']:.2f} s",
             str(c["registry_gets"]) if "registry_gets" in c else "–",
             f"{c['link_bytes'] / 1e6:.1f}" if "link_bytes" in c else "–"] for k, c in fo["by_path"].items()])
        L += [""]
    return L


def add_baselines(r: dict, other: dict) -> None:
    """Put the baselines images of `other` (a run of its own) beside those of `r`, saying when and how loaded."""
    b, o = r["baselines"], other["baselines"]
    sampled = [x[1] for x in other.get("load_samples", [])]
    when = (f"measured in a run of its own, {other['started']} – {other.get('finished', '(interrupted)')}, "
            f"peers {', '.join(k for k in next(iter(o['by_image'].values()), {}) if k in {p.key for p in baselines.PEERS})}"
            + (f", 1-minute load average {min(sampled):.1f}–{max(sampled):.1f}" if sampled else ""))
    for label, cells in o["by_image"].items():
        b["by_image"][label] = cells
        b["images"][label] = {**o["images"][label], "measured": when}
        if label in other.get("images", {}):
            r.setdefault("images", {})[label] = other["images"][label]
    b.setdefault("errors", {}).update(o.get("errors", {}))
    for label in o["by_image"]:
        b.get("errors", {}).pop(label, None)


def write(r: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    if "cold_start" in r:
        for profile in r["cold_start"]:
            pngs.append(charts.cold_start(r, profile, out).name)
    if "fanout" in r:
        pngs.append(charts.fanout(r, out).name)
    if "tiers" in r:
        pngs.append(charts.tiers(r, out).name)
    if "baselines" in r:
        pngs.append(charts.baselines(r, out).name)
    r["charts"] = pngs
    (out / "bench.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(r, pngs))
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {', '.join(pngs)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        if args.add_baselines:
            add_baselines(results, json.loads(args.add_baselines.read_text()))
        results["targets"] = targets(results)
        write(results, args.out)
        return 0
    # A background job of a non-interactive shell starts with SIGINT ignored, and its children would inherit
    # that: `imagestream run` could then not be stopped the Ctrl-C way (which unmounts). Handle both signals
    # here (handled signals are reset to their defaults in children), and turn SIGTERM into an exit that runs
    # every clean-up (stack down, link removed).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("python -m benchmarks needs root (network namespaces, tc, FUSE, chroot)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"python -m benchmarks needs `{tool}`", file=sys.stderr)
            return 2
    log(f"imagestream benchmarks{' (quick)' if args.quick else ''}: parts {','.join(args.parts)}; cache {CACHE}")
    try:
        results = run(args)
    except Exception:
        traceback.print_exc()
        return 1
    write(results, args.out)
    (args.out / "bench.partial.json").unlink(missing_ok=True)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
