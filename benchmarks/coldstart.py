"""Cold start against a full pull: time from `imagestream run` to the command's first output.

Two real commands:
* `python`: python3 importing a set of standard modules, then printing `ok`
  (first output = that line on its stdout);
* `http`: `python3 -m http.server` in the image; the chroot shares the host's
  network, so the benchmark polls it from outside (first output = the first
  HTTP answer).

Four ways to start, each run from the same stack, link and image:
* `full_pull`: IMAGESTREAM_STREAMING=off: every chunk is fetched through the
  node cache (node, zonal, regional over the link), the tree is written to local
  disk, then the command runs; node and zonal caches empty, no earlier pull kept;
* `stream_cold`: streamed mount, node and zonal caches empty, no startup profile;
* `stream_profile`: the same, on the image's second name which has a startup
  profile (recorded once by `imagestream profile` running the python program);
* `warm`: streamed mount right after the runs above: every chunk the command
  reads is already on the node's disk (a new mount, so the kernel's page cache of
  the mount is empty).
The modes and images are interleaved within each repetition, so that the ratios
compare runs made side by side.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import select
import signal
import statistics
import subprocess
import tempfile
import time

from benchmarks.setup import PYTHON, Image, Setup, log

MODES = ("full_pull", "stream_cold", "stream_profile", "warm")
# an experiment, not one of the four ways to start: streaming cold with the node's background download capped
BGCAP = "stream_bgcap"
BG_CAP_SETTING = "IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH"
COMMANDS = ("python", "http")


def _env(mode: str) -> dict[str, str]:
    env = {**os.environ, "IMAGESTREAM_PROFILE": "never"}  # measure; never record a profile while measuring
    env["IMAGESTREAM_STREAMING"] = "off" if mode == "full_pull" else "auto"
    return env


def _stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """Stop an `imagestream run` and its command the way Ctrl-C does; it unmounts on its way out.

    (SIGINT must not be ignored in this process: children would inherit that; see main().)
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"  `imagestream run` (pid {proc.pid}) ignored SIGINT for {timeout_s:.0f} s: killed")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            unmount_runs()
            return -9
    return proc.returncode


def unmount_runs() -> None:
    """Drop the leases a killed `imagestream run` left on its image."""
    from fuse_client import attach

    attached, _, _ = attach.attachments()
    for lease in (lease for a in attached for lease in a.leases if lease.startswith("run:")):
        attach.detach(lease)


def start_python(setup: Setup, name: str, mode: str, extra_env: dict | None = None, timeout_s: float = 900,
                 command: tuple[str, ...] = PYTHON, expect: str = "ok") -> dict:
    """Run the python program (or `command`, whose first line is `expect`); seconds until its first line of
    output, and what crossed the link by then."""
    env = {**_env(mode), **(extra_env or {})}
    before = setup.link.stats()
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(setup.cli_args("run", name, "--", *command),
                                stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else b""
            first = time.perf_counter() - started
            at_first = setup.link.stats()
            code = proc.wait(timeout_s)
        finally:
            _stop(proc)
        if line.decode(errors="replace").strip() != expect or code != 0:
            err.seek(0)
            raise RuntimeError(f"run {name} ({mode}): exit {code}, output {line!r}: {err.read()[-2000:].decode()}")
    return {"seconds": first, "link_bytes": at_first["down_bytes"] - before["down_bytes"]}


def start_http(setup: Setup, name: str, mode: str, port: int, timeout_s: float = 900) -> dict:
    """Start `python3 -m http.server` in the image; seconds until it answers a GET from outside."""
    env = _env(mode)
    before = setup.link.stats()
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            # the server must answer from this side: the container shares the host's network
            setup.cli_args("run", "--network", "host", name, "--", "python3", "-m", "http.server", str(port),
                           "--bind", "127.0.0.1"),
            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            status = None
            while time.perf_counter() - started < timeout_s:
                if proc.poll() is not None:
                    break
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/")
                    status = conn.getresponse().status
                    conn.close()
                    break
                except OSError:
                    time.sleep(0.01)
            first = time.perf_counter() - started
            at_first = setup.link.stats()
        finally:
            code = _stop(proc)
        if status != 200:
            err.seek(0)
            raise RuntimeError(f"http server in {name} ({mode}): status {status}, exit {code}: {err.read()[-2000:].decode()}")
    return {"seconds": first, "link_bytes": at_first["down_bytes"] - before["down_bytes"]}


def blocking_fetches() -> int:
    from imagestream.rpc.client import node_status

    return node_status().blocking_fetches


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setup: Setup, images: list[Image], runs: int, plan: dict | None = None,
            http_port: int | None = None, bg_cap: int = 0) -> dict:
    """{image: {command: {mode: {median, samples, link_bytes, ...}}}}; interleaved repetitions.

    `plan`: {image label: {command: modes}} (default: every command in every mode on every image).
    """
    http_port = http_port or free_port()
    plan = plan or {im.label: {c: MODES for c in COMMANDS} for im in images}
    out: dict = {im.label: {c: {m: {"samples": [], "link_bytes": [], "blocking_fetches": []} for m in modes}
                            for c, modes in plan[im.label].items()} for im in images}
    for rep in range(runs):
        for image in images:
            for command, modes in plan[image.label].items():
                streamed = False
                for mode in (*MODES, BGCAP):
                    if mode not in modes:
                        continue
                    if mode == BGCAP:
                        os.environ[BG_CAP_SETTING] = str(bg_cap)  # the node cache restarted next reads it
                    if mode != "warm":
                        setup.empty_caches()
                    elif not streamed:
                        _once(setup, image.name, command, "stream_cold", http_port)  # make it warm first
                    os.environ.pop(BG_CAP_SETTING, None)
                    name = image.profiled if mode == "stream_profile" else image.name  # stream_bgcap: no profile
                    fetches_before = blocking_fetches() if mode != "full_pull" else 0
                    sample = _once(setup, name, command, mode, http_port)
                    streamed = streamed or mode.startswith("stream")
                    cell = out[image.label][command][mode]
                    cell["samples"].append(sample["seconds"])
                    cell["link_bytes"].append(sample["link_bytes"])
                    if mode != "full_pull":
                        cell["blocking_fetches"].append(blocking_fetches() - fetches_before)
                    log(f"  run {rep + 1}/{runs} {image.label:5} {command:6} {mode:14} {sample['seconds']:7.2f} s, "
                        f"{sample['link_bytes'] / 1e6:7.1f} MB over the link by then")
    if any(BGCAP in modes for cmds in plan.values() for modes in cmds.values()):
        setup.empty_caches()  # the node cache without the cap again
    for image in out.values():
        for command in image.values():
            for cell in command.values():
                cell["median"] = statistics.median(cell["samples"])
                cell["link_bytes_median"] = statistics.median(cell["link_bytes"])
                if cell["blocking_fetches"]:
                    cell["blocking_fetches_median"] = statistics.median(cell["blocking_fetches"])
    return out


def _once(setup: Setup, name: str, command: str, mode: str, http_port: int) -> dict:
    if command == "python":
        return start_python(setup, name, mode)
    return start_http(setup, name, mode, http_port)


# -- what the application reads ---------------------------------------------------

def reads_before_output(setup: Setup, image: Image) -> dict:
    """One cold streamed run of the python program with IMAGESTREAM_RECORD_READS: what it read, in bytes and chunks.

    The program prints its line and exits, so its reads are the reads before the first output.
    """
    setup.empty_caches()
    record = pathlib.Path(tempfile.mkstemp(prefix="bench-reads-", suffix=".jsonl")[1])
    try:
        sample = start_python(setup, image.name, "stream_cold", {"IMAGESTREAM_RECORD_READS": str(record)})
        reads = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    finally:
        record.unlink(missing_ok=True)
    _, index = setup.image_chunks(image)
    cs = index.chunk_size
    ranges: dict[int, list[tuple[int, int]]] = {}
    touched: dict = {}
    for r in reads:
        inode = index.inode(r["inode"])
        end = min(r["offset"] + r["size"], inode.size)
        if end <= r["offset"]:
            continue
        ranges.setdefault(r["inode"], []).append((r["offset"], end))
        for i in range(r["offset"] // cs, (end - 1) // cs + 1):
            ext = inode.extents[i]
            if ext.HasField("chunk"):
                touched[(ext.chunk.hash, ext.chunk.size_bytes)] = ext.chunk.size_bytes
    read_bytes = 0
    for spans in ranges.values():  # bytes read, each byte once
        spans.sort()
        cur_start, cur_end = spans[0]
        for s, e in spans[1:]:
            if s > cur_end:
                read_bytes += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        read_bytes += cur_end - cur_start
    chunk_bytes = sum(touched.values())
    return {
        "reads": len(reads), "files": len(ranges), "bytes_read": read_bytes,
        "chunks_touched": len(touched), "chunk_bytes_touched": chunk_bytes,
        "share_read_of_content": read_bytes / image.content_bytes,
        "share_chunks_of_content": chunk_bytes / image.content_bytes,
        "link_bytes_at_first_output": sample["link_bytes"],
        "share_link_of_compressed": sample["link_bytes"] / image.compressed_bytes,
        "seconds": sample["seconds"],
    }
