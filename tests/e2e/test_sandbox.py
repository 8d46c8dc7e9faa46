"""`imagestream run` is a container: the escapes issue 12 reproduced on the old chroot are each denied here,
through runc, on the real stack, for a streamed and for a fully pulled image."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import time

import pytest

from tests.conftest import as_foreground_job, needs_fuse, run_cli

pytestmark = [pytest.mark.services, needs_fuse]

IMAGE = "debian-python:sandbox"
MODES = ["streamed", "pulled"]


@pytest.fixture(scope="module")
def image(stack, debian_image):  # type: ignore[no-untyped-def]
    run_cli("push", "--quiet", str(debian_image), IMAGE)
    return IMAGE


def sh(script: str, mode: str = "streamed", *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"IMAGESTREAM_STREAMING": "off"} if mode == "pulled" else {}
    return run_cli("run", *flags, IMAGE, "--", "sh", "-c", script, env=env, check=check)


@pytest.mark.parametrize("mode", MODES)
def test_host_processes_are_not_visible(image, mode) -> None:  # type: ignore[no-untyped-def]
    out = sh("ls /proc | grep -E '^[0-9]+$'; echo; cat /proc/1/cmdline | tr '\\0' ' '", mode).stdout
    pids, _, init = out.partition("\n\n")
    assert str(os.getpid()) not in pids.split()
    assert len(pids.split()) <= 5, pids  # sh and its children only
    assert init.startswith("sh -c ")  # the command is PID 1 of a namespace of its own


@pytest.mark.parametrize("mode", MODES)
def test_a_root_only_host_file_cannot_be_read_through_proc(image, mode, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    token = hashlib.sha256(os.urandom(16)).hexdigest()
    secret.write_text(token)
    secret.chmod(0o600)
    holder = subprocess.Popen(["sleep", "60"])  # a host process whose /proc/<pid>/root is the host's /
    try:
        script = (f"cat /proc/{holder.pid}/root{secret}; cat /proc/{os.getpid()}/root{secret}; "
                  f"cat /proc/1/root{secret}; cat {secret}; echo done")
        result = sh(script, mode)
    finally:
        holder.kill()
        holder.wait()
    assert token not in result.stdout + result.stderr
    assert result.stdout.strip().endswith("done")


@pytest.mark.parametrize("mode", MODES)
def test_host_dev_and_sys_cannot_be_written(image, mode) -> None:  # type: ignore[no-untyped-def]
    name = f"imagestream-escape-{os.getpid()}-{mode}"
    disk = next((p.read_text().strip() for p in sorted(pathlib.Path("/sys/block").glob("*/dev"))
                 if not p.parent.name.startswith(("loop", "zram", "ram"))), "8:0")
    major, minor = disk.split(":")
    hostname = socket.gethostname()
    script = (
        f"echo x > /dev/{name}; "  # lands in the container's own tmpfs
        f"mknod /tmp/disk b {major} {minor} && (head -c 512 /tmp/disk > /dev/null && echo READ-DISK); "
        f"touch /sys/{name} && echo WROTE-SYS; "
        "echo 1 > /sys/kernel/mm/ksm/run && echo WROTE-SYS-KNOB; "
        "echo imagestream-escape > /proc/sys/kernel/hostname && echo WROTE-PROC-SYS; "
        "echo h > /proc/sysrq-trigger && echo WROTE-SYSRQ; "
        "ls /dev; echo end"
    )
    result = sh(script, mode)
    assert "end" in result.stdout
    for marker in ("READ-DISK", "WROTE-SYS", "WROTE-PROC-SYS", "WROTE-SYSRQ"):
        assert marker not in result.stdout, (marker, result.stdout, result.stderr)
    assert not os.path.exists(f"/dev/{name}") and not os.path.exists(f"/sys/{name}")
    assert socket.gethostname() == hostname
    listed = set(result.stdout.split())
    assert {"null", "zero", "urandom", "tty", "pts"} <= listed
    assert not listed & {"vda", "sda", "fuse", "kmsg", "mem", "loop0"}  # a minimal /dev


@pytest.mark.parametrize("mode", MODES)
def test_capabilities_are_a_containers_default_set(image, mode) -> None:  # type: ignore[no-untyped-def]
    script = ("grep -E '^Cap(Eff|Bnd|Amb|Inh)' /proc/self/status; grep NoNewPrivs /proc/self/status; "
              "mount -t tmpfs t /mnt && echo MOUNTED; unshare --mount true && echo UNSHARED; "
              "echo b > /proc/sysrq-trigger; echo end")
    out = sh(script, mode).stdout
    fields = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    full = (1 << 41) - 1
    assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0xA80425FB  # Docker's 14 capabilities
    assert int(fields["CapEff"], 16) != full
    assert int(fields["CapAmb"], 16) == int(fields["CapInh"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert "MOUNTED" not in out and "UNSHARED" not in out and out.strip().endswith("end")


# x86_64 system call numbers, called directly (no tool in the image needed); each prints ok or its errno name
SYSCALLS = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(name, "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()])
call("getpid", 39)
call("unshare", 272, 0x10000000)  # CLONE_NEWUSER: needs no capability, only the filter stops it
call("keyctl", 250, 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
call("add_key", 248, b"user", b"imagestream-test", b"x", 1, -3)
call("mount", 165, b"none", b"/mnt", b"tmpfs", 0, None)
call("bpf", 321, 0, None, 0)
print("Seccomp", [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers of x86_64")
@pytest.mark.parametrize("mode", MODES)
def test_system_calls_outside_the_allowlist_fail_inside_run(image, mode) -> None:  # type: ignore[no-untyped-def]
    # the control: in a plain child process on the host (root), unshare, keyctl and add_key work
    host = subprocess.run(["python3", "-c", SYSCALLS], capture_output=True, text=True, check=True).stdout
    host_results = dict(line.split() for line in host.splitlines())
    assert host_results["unshare"] == host_results["keyctl"] == host_results["add_key"] == "ok", host
    out = run_cli("run", IMAGE, "--", "python3", "-c", SYSCALLS,
                  env={"IMAGESTREAM_STREAMING": "off"} if mode == "pulled" else {}).stdout
    results = dict(line.split() for line in out.splitlines())
    assert results["getpid"] == "ok"
    assert results["Seccomp"] == "2"  # a filter is loaded
    for name in ("unshare", "keyctl", "add_key", "mount", "bpf"):
        assert results[name] == "EPERM", (name, out)


@pytest.mark.parametrize("mode", MODES)
def test_setuid_does_not_escalate(image, mode) -> None:  # type: ignore[no-untyped-def]
    script = ("cp /usr/bin/python3 /tmp/py && chmod 4755 /tmp/py && "
              "setpriv --reuid=65534 --regid=65534 --clear-groups /tmp/py -c 'import os; print(\"euid\", os.geteuid())'")
    out = sh(script, mode).stdout
    assert out.strip() == "euid 65534"  # no_new_privs: the set-uid bit is ignored


def test_a_full_pull_is_root_only_and_removed_with_the_image(image, debian_image, stack_home) -> None:  # type: ignore[no-untyped-def]
    name = "debian-python:sandbox-pulled"
    run_cli("push", "--quiet", "--no-streaming", str(debian_image), name)
    run_cli("run", name, "--", "true")
    index = next(line.split()[1] for line in run_cli("images").stdout.splitlines() if line.startswith(name + " "))
    pulled = stack_home / "pulled"
    assert stat.S_IMODE(pulled.stat().st_mode) == 0o700
    tree = next(p for p in pulled.iterdir() if p.name.startswith(index))
    assert stat.S_IMODE(tree.stat().st_mode) == 0o700
    # an unprivileged host user reaches nothing in it, the image's set-uid binaries included
    setuid = next(p for p in sorted((tree / "usr/bin").iterdir()) if p.lstat().st_mode & stat.S_ISUID)
    denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "sh", "-c", f"exec {setuid} --help"], capture_output=True, text=True)
    assert denied.returncode in (126, 127) and "Permission denied" in denied.stderr, (setuid, denied)
    assert "removed the full pull" in run_cli("rm", name).stdout
    assert not tree.exists()


def test_the_network_is_private_unless_host_is_asked(image) -> None:  # type: ignore[no-untyped-def]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    probe = (f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2); print('CONNECTED')\" "
             "2>/dev/null; cat /sys/class/net/*/operstate 2>/dev/null | wc -l; ls /sys/class/net")
    try:
        private = sh(probe).stdout
        shared = sh(probe, "streamed", "--network", "host").stdout
    finally:
        listener.close()
    assert "CONNECTED" not in private and private.split()[-1] == "lo"  # loopback only
    assert "CONNECTED" in shared


def test_ctrl_c_stops_a_command_that_ignores_it_and_cleans_up(image, stack_home) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(["imagestream", "run", IMAGE, "--", "sleep", "1000"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground_job)
    deadline = time.monotonic() + 60
    while "ImageStreaming engaged" not in (line := proc.stderr.readline()) and time.monotonic() < deadline:
        assert line, "run ended before streaming was engaged"
    time.sleep(1.0)  # sleep has started in the container
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    code = proc.wait(30)
    # sleep, as PID 1, ignores SIGINT: it is killed after the grace period
    assert time.monotonic() - started < 20
    assert code in (130, 137), code
    with open("/proc/self/mountinfo") as f:
        assert str(stack_home / "runs") not in f.read()
    assert not any((stack_home / "runs").iterdir())
    assert not subprocess.run(["pgrep", "-f", "sleep 1000"], capture_output=True).stdout


def test_the_image_user_workdir_and_env_apply(image, debian_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout = tmp_path / "layout"
    shutil.copytree(debian_image, layout, copy_function=os.link)  # blobs are only added, never rewritten
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((blobs / manifest_digest[7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    config.setdefault("config", {}).update({"User": "nobody", "WorkingDir": "/tmp/work", "Env": ["GREETING=hi"]})

    def put(doc: dict) -> dict:
        data = json.dumps(doc).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    manifest["config"].update(put(config))
    index["manifests"][0].update(put(manifest))
    (layout / "index.json").unlink()  # a link to the shared cached image's: never write through it
    (layout / "index.json").write_text(json.dumps(index))
    run_cli("push", "--quiet", str(layout), "debian-python:nobody")
    out = run_cli("run", "debian-python:nobody", "--", "sh", "-c", "id -u; id -g; pwd; echo $GREETING; echo $HOME").stdout
    assert out.split() == ["65534", "65534", "/tmp/work", "hi", "/nonexistent"]
