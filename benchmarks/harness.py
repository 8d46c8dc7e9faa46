"""What every benchmark needs: a private stack, cold caches, repeated timings, and reports."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("IMAGESTREAM_CACHE_DIR", ROOT / ".cache")).absolute()


@contextlib.contextmanager
def private_stack(port_base: int = 20300) -> Iterator[dict[str, str]]:
    """A stack of the benchmark's own (own home and ports), torn down afterwards."""
    from imagestream_dev.stack import local

    home = pathlib.Path(tempfile.mkdtemp(prefix="imagestream-bench-"))
    env = local.private_env(home, CACHE, port_base)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    failed = True
    try:
        local.up(lambda line: print(line, flush=True))
        yield env
        failed = False
    finally:
        local.down(lambda _: None)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if failed:  # the services' logs say why
            kept = pathlib.Path(tempfile.mkdtemp(prefix="imagestream-bench-logs-"))
            shutil.copytree(home / "logs", kept, dirs_exist_ok=True)
            print(f"benchmark failed: the services' logs are kept in {kept}", flush=True)
        shutil.rmtree(home, ignore_errors=True)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> bool:
    """Signal a process started in a session of its own, and its group; SIGKILL after timeout_s. True if killed."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout_s)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def end_under(folder: pathlib.Path) -> None:
    """End every process whose command line names `folder` (snapshotters, nydusd, shims), then unmount under it."""
    needle = str(folder).encode()
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    with open("/proc/self/mountinfo") as f:
        ours = [line.split()[4] for line in f if line.split()[4].startswith(str(folder))]
    for mountpoint in sorted(ours, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def fresh_snapshotter() -> None:
    """The stack's snapshotter restarted with no snapshots and no mounts (a cold node's, for containerd)."""
    from fuse_client import mounts
    from imagestream import config
    from imagestream_dev.stack import local

    local.down(lambda _: None, only="snapshotter")
    for m in mounts.list_mounts():
        if m.mountpoint.startswith(str(config.snapshotter_root())):
            mounts.unmount(m.mountpoint)
    shutil.rmtree(config.snapshotter_root(), ignore_errors=True)
    local.up(lambda _: None, only="snapshotter")


def drop_page_cache() -> bool:
    """Drop the kernel's page cache, so that "from disk" means from disk. False if not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_of(runs: int, fn: Callable[[], float], before: Callable[[], None] | None = None) -> dict:
    """Run `fn` (which returns a measurement) `runs` times; the median and every sample."""
    samples = []
    for _ in range(runs):
        if before is not None:
            before()
        samples.append(fn())
    return {"median": statistics.median(samples), "samples": samples}


def imagestream_command() -> str:
    """The `imagestream` console script of the Python running the benchmark (`.venv/bin/python -m benchmarks...`
    finds its own without PATH), else whichever is on PATH."""
    beside = pathlib.Path(sys.executable).parent / "imagestream"
    return str(beside) if os.access(beside, os.X_OK) else "imagestream"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([imagestream_command(), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"imagestream {' '.join(args)}: {result.stderr}")
    return result


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def write_report(name: str, results: dict, table: list[tuple[str, ...]], out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               **results}
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    m = results["machine"]
    lines += ["", f"Measured {results['when']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
              f"Linux {m['kernel']}, Python {m['python']}; medians of the runs listed in `{name}.json`."]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

