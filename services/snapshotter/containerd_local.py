"""A private containerd daemon (Debian's containerd + runc) with imagestream's snapshotter plugged in.

Everything it owns (config, root, state, sockets) lives under one folder, so it
runs beside any other containerd; used by the tests and the benchmark, and a
worked example of the configuration in docs/containerd.md.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

from imagestream import tls

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

# imagestream's snapshotter, a proxy plugin: containerd calls it over gRPC on its Unix socket
[proxy_plugins]
  [proxy_plugins.imagestream]
    type = "snapshot"
    address = "{snapshotter_socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

# The Kubernetes path (CRI): pull with the imagestream snapshotter; keep the snapshot
# annotations on, so containerd hands the layers' labels to the snapshotter.
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "imagestream"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dir}/cni/bin"
    conf_dir = "{dir}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{dir}/certs.d"
"""

# containerd 2.x (its own configuration version): where a private instance in DIR keeps its state and
# sockets, and the plugins no node here uses. Shared by the imagestream node below and the peers' nodes
# of the benchmarks (benchmarks/baselines.py), which add their own sections.
UNUSED_PLUGINS_V3 = ("io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                     "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
                     "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing")
HEAD_V3 = """\
version = 3
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

"""


def config_head_v3(directory: pathlib.Path, also_disabled: tuple[str, ...] = ()) -> str:
    """The head of a private containerd 2.x's config.toml in `directory` (its socket: containerd.sock)."""
    disabled = ", ".join(f'"{p}"' for p in (*also_disabled, *UNUSED_PLUGINS_V3))
    return HEAD_V3.format(dir=directory, disabled=disabled)


# The imagestream node's sections for containerd 2.x (the CRI plugin is split in images and runtime).
CONFIG_V3 = """\
[proxy_plugins]
  [proxy_plugins.imagestream]
    type = "snapshot"
    address = "{snapshotter_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "imagestream"
  disable_snapshot_annotations = false
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{dir}/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{dir}/cni/bin"]
    conf_dir = "{dir}/cni/conf"
"""

HOSTS_TOML = """\
server = "http://{host}"

[host."http://{host}"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
"""

# the regional OCI endpoint with mutual TLS: containerd trusts the CA and presents the node agent's certificate
HOSTS_TOML_TLS = """\
server = "https://{host}"

[host."https://{host}"]
  capabilities = ["pull", "resolve"]
  ca = "{ca}"
  client = [["{cert}", "{key}"]]
"""


def hosts_toml(host: str) -> str:
    if not tls.enabled():
        return HOSTS_TOML.format(host=host)
    return HOSTS_TOML_TLS.format(host=host, ca=tls.ca_path(), cert=tls.cert_path("snapshotter"),
                                 key=tls.key_path("snapshotter"))


class PrivateContainerd:
    def __init__(self, directory: pathlib.Path, snapshotter_socket: str, registries: tuple[str, ...] = (),
                 bin_dir: pathlib.Path | None = None) -> None:
        """`bin_dir`: a folder holding containerd 2.x, its shim and ctr (runc in it or in its parent), used
        instead of Debian's containerd 1.6 on PATH."""
        self.dir = directory
        self.bin_dir = bin_dir
        self.socket = str(directory / "containerd.sock")
        self.snapshotter_socket = snapshotter_socket
        self.registries = registries  # host:port of plain-HTTP registries (the regional tier's)
        self.process: subprocess.Popen | None = None
        self.log = directory / "containerd.log"

    def write_config(self) -> pathlib.Path:
        for d in ("root", "state", "opt", "cni/bin", "cni/conf"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        for host in self.registries:
            hosts = self.dir / "certs.d" / host
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "hosts.toml").write_text(hosts_toml(host))
        config = self.dir / "config.toml"
        config.write_text(self.config_text())
        return config

    def config_text(self) -> str:
        # a bin_dir holds containerd 2.x (scripts/peers/build); the one on PATH is Debian's 1.6
        if self.bin_dir is not None:
            return config_head_v3(self.dir) + CONFIG_V3.format(snapshotter_socket=self.snapshotter_socket, dir=self.dir)
        return CONFIG.format(root=self.dir / "root", state=self.dir / "state", socket=self.socket,
                             snapshotter_socket=self.snapshotter_socket, dir=self.dir)

    def _binary(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir is not None else name

    def _env(self) -> dict[str, str]:
        """containerd finds its shim, and the shim runc, on PATH."""
        if self.bin_dir is None:
            return dict(os.environ)
        return {**os.environ, "PATH": os.pathsep.join([str(self.bin_dir), str(self.bin_dir.parent), os.environ.get("PATH", "")])}

    def start(self, timeout_s: float = 30.0) -> None:
        config = self.write_config()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self._binary("containerd"), "--config", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=self._env())
        deadline = time.monotonic() + timeout_s
        while self.ctr("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def ctr(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([self._binary("ctr"), "--address", self.socket, "--namespace", namespace, *args],
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def stop(self) -> None:
        """Stop every container it runs, then the daemon; unmount whatever it left under its folder."""
        if self.process is not None and self.process.poll() is None:
            for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
                for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
                    self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False)
                for container in self.ctr("containers", "ls", "-q", namespace=ns, check=False).stdout.split():
                    self.ctr("containers", "delete", container, namespace=ns, check=False)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # shims run in sessions of their own: end those that belong to this daemon
        for proc in pathlib.Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"containerd-shim-runc-v2") and self.socket.encode() in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with open("/proc/self/mountinfo") as f:
            ours = [line.split()[4] for line in f if line.split()[4].startswith(str(self.dir))]
        for mountpoint in sorted(ours, key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
