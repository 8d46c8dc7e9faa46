"""Run a command in a mounted image, as a container runtime would.

`run()` attaches the image to the node's FUSE client (its directory in the
node's mount, read-only), then starts this module as a child that enters a
private mount namespace, puts a writable overlay (one upper dir per run) over
the image, mounts /proc and binds /dev and /sys, chroots and execs the command.
Every mount lives in that namespace and vanishes with it, so nothing is left
behind even on Ctrl-C; the image's lease is dropped by `run()` itself in a
finally.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import uuid

from imagestream import config

CLONE_NEWNS = 0x00020000


def describe(name: str):  # type: ignore[no-untyped-def]
    """The image record and its runtime config (Env, WorkingDir, ...), read through the node cache."""
    import asyncio

    from imagestream.digests import Digest
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
    from imagestream.index import load_index

    async def fetch():  # type: ignore[no-untyped-def]
        target = "unix:" + config.node_cache_socket()
        store, names = GrpcChunkStore(target), GrpcImageNames(target)
        try:
            image = await names.resolve(name)
            return image, (await load_index(store, Digest.from_proto(image.index))).config()
        finally:
            await store.close()
            await names.close()

    return asyncio.run(fetch())


def container_env(image_env: list[str], extra: list[str]) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    for item in [*image_env, *extra]:
        key, sep, value = item.partition("=")
        if not sep:
            value = os.environ.get(key, "")  # `-e NAME` passes the caller's value, as docker does
        env[key] = value
    if "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    return env


def run(name: str, command: list[str], extra_env: list[str] = (), keep: bool = False) -> int:  # type: ignore[assignment]
    """Run `command` in image `name` and clean up; the command's exit status (128+N if killed by signal N).

    The image is streamed (FUSE mount) where this node can; otherwise it is pulled in full first, and
    the tool says why streaming was not engaged.
    """
    from fuse_client.mounts import streaming_unavailable_reason
    from imagestream.errors import FailedPrecondition

    run_id = uuid.uuid4().hex[:12]
    run_dir = config.home() / "runs" / run_id
    upper, work, merged = (run_dir / d for d in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    lease = f"run:{run_id}"
    reason = streaming_unavailable_reason(False)
    try:
        if reason is None:
            from fuse_client import attach

            try:
                attached = attach.attach(name, lease)
                lower, cfg = pathlib.Path(attached.path), attached.config
            except FailedPrecondition as e:  # e.g. pushed with streaming disabled
                reason = str(e)
            else:
                print(f"imagestream: ImageStreaming engaged for {name}", file=sys.stderr)
        if reason is not None:
            from imagestream_cli import pull

            _, cfg = describe(name)
            print(f"imagestream: streaming not engaged for {name}: {reason}; pulling the whole image first",
                  file=sys.stderr)
            lower = pull.pull(name)
        try:
            env = container_env(cfg.get("Env") or [], list(extra_env))
            child = subprocess.Popen(
                [sys.executable, "-m", "imagestream_cli.sandbox", str(run_dir), str(lower), cfg.get("WorkingDir") or "/",
                 "--", *command],
                env={**env, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])},
            )
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:
                    child.send_signal(signal.SIGINT)  # the terminal already sent it; make sure, then wait
        finally:
            if reason is None:
                # `imagestream profile` reports the profile saved; a plain run leaves that to the node
                attach.detach(lease, wait=config.get("profile") == "always")
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 128 - code if code < 0 else code


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def enter(run_dir: pathlib.Path, lower: pathlib.Path, workdir: str, command: list[str]) -> None:
    """In the child: private mount namespace, overlay, /proc /dev /sys, chroot, exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise SystemExit(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    _mount("--make-rprivate", "/")  # nothing mounted here propagates back to the host
    merged = run_dir / "merged"
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir={lower},upperdir={run_dir / 'upper'},workdir={run_dir / 'work'}", str(merged))
    for d in ("proc", "dev", "sys"):
        (merged / d).mkdir(exist_ok=True)
    _mount("-t", "proc", "proc", str(merged / "proc"))
    _mount("--rbind", "/dev", str(merged / "dev"))
    _mount("--rbind", "/sys", str(merged / "sys"))
    os.chroot(merged)
    os.chdir(workdir if os.path.isdir(workdir) else "/")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"imagestream run: cannot execute {command[0]!r} in the image: {e.strerror}", file=sys.stderr)
        raise SystemExit(127) from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="imagestream_cli.sandbox")
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("lower", type=pathlib.Path)
    parser.add_argument("workdir")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    enter(a.run_dir, a.lower, a.workdir, command)
