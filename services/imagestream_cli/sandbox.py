"""Run a command in a mounted image, as a container runtime would: through runc.

`run()` attaches the image to the node's FUSE client (its directory in the
node's mount: read-only, nosuid, nodev) or pulls it in full, writes an OCI
runtime config (`oci_config`) into a bundle beside a writable upper dir, and
starts `runc run` inside a private mount namespace (`unshare`) that holds the
overlay of the image and the upper dir: that overlay vanishes with the
namespace, so nothing is left mounted even on Ctrl-C or a kill; the image's
lease is dropped by `run()` itself in a finally.

The container gets what a container runtime's defaults give: new PID, IPC, UTS,
mount and network namespaces (or the host's network on request), a fresh
/proc with runc's masked and read-only paths, a tmpfs /dev holding only the
standard devices (and a device cgroup that denies the rest), a read-only
/sys, containerd's default capability set, no_new_privs, a seccomp allowlist after
Docker's default profile (seccomp.py: no mount, unshare, setns, keyctl, bpf, ...), and
the image's Env, WorkingDir and User.

No user namespace: the image's files (FUSE and the overlay's upper dir) belong to host
uid 0, which a namespace mapping the container's root to an unprivileged host range
does not map, so they would show as nobody and the container's root could not write
where the image's root can (its /etc, /root, ...). An idmapped mount of the root would
lift that; Debian's runc (1.1) cannot make one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, NoReturn

from imagestream import config
from imagestream.errors import BadImage, ImagestreamError

# containerd's and Docker's default set (oci.defaultUnixCaps): no CAP_SYS_ADMIN, CAP_SYS_PTRACE,
# CAP_SYS_MODULE, CAP_NET_ADMIN, CAP_DAC_READ_SEARCH, ...
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
# runc's and containerd's defaults
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORKS = ("none", "host")  # none: a namespace of its own with loopback only
STOP_GRACE_S = 5.0  # after Ctrl-C, how long the command may take to exit before it is killed


class SandboxError(ImagestreamError):
    pass


def describe(name: str):  # type: ignore[no-untyped-def]
    """The image record and its runtime config (Env, WorkingDir, ...), read through the node cache."""
    import asyncio  # here: a streamed start never needs it

    from imagestream.digests import Digest
    from imagestream.index import load_config
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames

    async def fetch():  # type: ignore[no-untyped-def]
        target = "unix:" + config.node_cache_socket()
        store, names = GrpcChunkStore(target), GrpcImageNames(target)
        try:
            image = await names.resolve(name)
            return image, await load_config(store, Digest.from_proto(image.index))
        finally:
            await store.close()
            await names.close()

    return asyncio.run(fetch())


def container_env(image_env: list[str], extra: list[str], home: str = "/root") -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": home}
    for item in [*image_env, *extra]:
        if not isinstance(item, str):
            raise BadImage(f"image config: Env holds {item!r}, not a string")
        key, sep, value = item.partition("=")
        if not sep:
            value = os.environ.get(key, "")  # `-e NAME` passes the caller's value, as docker does
        env[key] = value
    if "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    return env


# -- the image's user -------------------------------------------------------------

def _read_in_tree(root: pathlib.Path, *parts: str, limit: int = 4 << 20) -> bytes | None:
    """A file of the image's tree, resolved component by component without following any symlink
    (an image's /etc/passwd may be a link to a host path); None if it is not a plain file there."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fds.append(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
        import stat

        if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
            return None
        return os.read(fds[-1], limit)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _table(data: bytes | None) -> list[list[str]]:
    if not data:
        return []
    return [line.split(":") for line in data.decode("utf-8", "replace").splitlines() if line and line[0] != "#"]


def resolve_user(spec: str, root: pathlib.Path) -> tuple[int, int, list[int], str | None]:
    """(uid, gid, supplementary gids, home) for the image's User ('name', 'uid', 'name:group', 'uid:gid'),
    looked up in the image's own /etc/passwd and /etc/group, as docker does."""
    user, _, group = spec.partition(":")
    passwd = _table(_read_in_tree(root, "etc", "passwd"))
    groups = _table(_read_in_tree(root, "etc", "group"))
    entry = next((p for p in passwd if len(p) >= 6 and (p[0] == user or p[2] == user)), None)
    if entry is not None:
        uid, gid, home, login = int(entry[2]), int(entry[3]), entry[5] or None, entry[0]
    elif user.isdigit():
        uid, gid, home, login = int(user), 0, None, None
    else:
        raise SandboxError(f"image config: User {spec!r}: no user {user!r} in the image's /etc/passwd")
    if group:
        found = next((g for g in groups if len(g) >= 3 and (g[0] == group or g[2] == group)), None)
        if found is not None:
            gid = int(found[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise SandboxError(f"image config: User {spec!r}: no group {group!r} in the image's /etc/group")
    extra = sorted({int(g[2]) for g in groups if len(g) >= 4 and g[2].isdigit() and login
                    and login in g[3].split(",")} - {gid}) if login and not group else []
    if not (0 <= uid < 2**32 and 0 <= gid < 2**32):
        raise SandboxError(f"image config: User {spec!r} is out of range")
    return uid, gid, extra, home


# -- the OCI runtime config -------------------------------------------------------------

def oci_config(rootfs: pathlib.Path, command: list[str], env: dict[str, str], cwd: str = "/",
               uid: int = 0, gid: int = 0, additional_gids: list[int] = (), network: str = "none",  # type: ignore[assignment]
               hostname: str = "imagestream", terminal: bool = False, cgroup: str = "") -> dict[str, Any]:
    """The runtime spec (config.json) `runc run` gets."""
    from imagestream_cli import seccomp

    if network not in NETWORKS:
        raise ValueError(f"network {network!r}: want one of {', '.join(NETWORKS)}")
    if not cwd.startswith("/"):
        cwd = "/"
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "none":
        namespaces.append({"type": "network"})  # runc brings up its loopback
    mounts_ = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    if network == "host":
        for f in ("/etc/resolv.conf", "/etc/hosts"):  # names resolve as on the host, as docker --network host does
            if os.path.isfile(f):
                mounts_.append({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro", "nosuid", "nodev"]})
    caps = list(DEFAULT_CAPABILITIES)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": list(additional_gids)} if additional_gids else {})},
            "args": command,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            # no inheritable or ambient capabilities: a non-root user's exec drops the rest (CVE-2022-24769)
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": mounts_,
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},  # runc adds the standard devices
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp.profile(),
        },
    }
    if cgroup:
        spec["linux"]["cgroupsPath"] = cgroup
    return spec


def _runc() -> str:
    found = shutil.which("runc")
    if found is None:
        raise SandboxError("run needs the OCI runtime runc (Debian package runc)")
    return found


# Inside a mount namespace of its own: the overlay, then runc with the overlay as the container's root.
_ENTER = 'mount -t overlay overlay -o "$1" "$2" || exit 125; exec "$3" --root "$4" run --bundle "$5" "$6"'


def run_command(name: str, command: list[str], extra_env: list[str] = (), keep: bool = False,  # type: ignore[assignment]
                network: str = "none") -> NoReturn:
    """`imagestream run NAME [--] COMMAND...`: run it, exit with its status; an error is one line, status 1."""
    if command[:1] == ["--"]:  # `run NAME -- CMD`: the "--" only ends the options
        command = command[1:]
    try:
        if os.geteuid() != 0:
            raise SandboxError("run needs root (mount namespaces, overlayfs, runc)")
        if not command:
            raise SandboxError(f"run {name}: no command given (imagestream run NAME -- COMMAND...)")
        code = run(name, command, extra_env, keep=keep, network=network)
    except ImagestreamError as e:
        print(f"imagestream: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def run(name: str, command: list[str], extra_env: list[str] = (), keep: bool = False,  # type: ignore[assignment]
        network: str = "none") -> int:
    """Run `command` in image `name` and clean up; the command's exit status (128+N if killed by signal N).

    The image is streamed (attached to the node's FUSE client) where this node can; otherwise it is
    pulled in full first, and the tool says why streaming was not engaged.
    """
    from fuse_client.availability import streaming_unavailable_reason
    from imagestream.errors import FailedPrecondition

    runc = _runc()
    run_id = os.urandom(6).hex()
    runs = config.home() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    os.chmod(runs, 0o700)  # upper dirs hold what the command wrote, set-uid files included
    run_dir = runs / run_id
    upper, work, merged, bundle, state = (run_dir / d for d in ("upper", "work", "merged", "bundle", "runc"))
    for d in (upper, work, merged, bundle):
        d.mkdir(parents=True)
    lease = None
    reason = streaming_unavailable_reason(False)
    try:
        if reason is None:
            from fuse_client import held

            try:
                # held for as long as this process lives: a killed run leaves nothing attached
                lease = held.hold(name, f"run:{run_id}")
                lower, cfg = pathlib.Path(lease.attached.path), lease.attached.config
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
            if not isinstance(cfg, dict):
                raise BadImage(f"image config is {type(cfg).__name__}, not an object")
            user = cfg.get("User") or ""
            if not isinstance(user, str):
                raise BadImage(f"image config: User is {user!r}, not a string")
            uid, gid, extra_gids, home = resolve_user(user, lower) if user else (0, 0, [], None)
            workdir = cfg.get("WorkingDir") or "/"
            if not isinstance(workdir, str):
                raise BadImage(f"image config: WorkingDir is {workdir!r}, not a string")
            env = container_env(cfg.get("Env") or [], list(extra_env), home or ("/root" if uid == 0 else "/"))
            terminal = sys.stdin.isatty() and sys.stdout.isatty()
            spec = oci_config(merged, command, env, workdir, uid, gid, extra_gids, network,
                              hostname=run_id, terminal=terminal, cgroup=f"/imagestream/{run_id}")
            (bundle / "config.json").write_text(json.dumps(spec))
            options = f"lowerdir={lower},upperdir={upper},workdir={work}"
            child = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER, "sh",
                 options, str(merged), runc, str(state), str(bundle), f"imagestream-{run_id}"])
            code = _wait(child, runc, state, f"imagestream-{run_id}")
        finally:
            if lease is not None:
                # `imagestream profile` reports the profile saved; a plain run leaves that to the node
                lease.detach(wait=config.get("profile") == "always")
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 128 - code if code < 0 else code


def _wait(child: subprocess.Popen, runc: str, state: pathlib.Path, container: str) -> int:
    """The child's exit status. Ctrl-C reaches the command (runc forwards it); a command that does not
    exit within STOP_GRACE_S (a PID 1 ignores SIGINT unless it handles it), or a second Ctrl-C, kills it."""
    deadline: float | None = None
    while True:
        try:
            return child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            if deadline is None:
                child.send_signal(signal.SIGINT)  # the terminal already sent it; make sure, then wait
                deadline = time.monotonic() + STOP_GRACE_S
            else:
                deadline = time.monotonic()
        except subprocess.TimeoutExpired:
            subprocess.run([runc, "--root", str(state), "kill", container, "KILL"], capture_output=True)
            deadline = time.monotonic() + STOP_GRACE_S
