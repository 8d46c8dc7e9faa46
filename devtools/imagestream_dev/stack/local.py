"""The local stack: Redis, Cassandra (one node, or one per address of IMAGESTREAM_CASSANDRA_HOSTS) and the
three tier services, on loopback.

`processes()` is the one definition of what runs and how it is checked; the
`imagestream stack` commands and the Tiltfile's local branch both read it.
All state lives under the configured home folder (IMAGESTREAM_HOME).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable

from imagestream import config
from imagestream.proc import alive


@dataclasses.dataclass
class Process:
    name: str
    command: list[str]
    # how to tell it is ready: ("tcp", host, port) | ("grpc", target) | ("cql", host, port) | ("redis", host, port)
    ready: tuple
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    start_timeout_s: float = 60.0
    prepare: Callable[[], None] | None = None  # one-time set-up before the first start (config files, jars)
    phase: int = 1  # backends are phase 0 and start together; the tier services follow, in order

    def describe(self) -> dict:
        return {"name": self.name, "command": self.command, "ready": list(self.ready), "env": self.env}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def services_path() -> str:
    return str(pathlib.Path(__file__).resolve().parents[2])


def processes() -> list[Process]:
    """What `stack up` starts, in order (each waits for the ones before it)."""
    home = config.home()
    cache = pathlib.Path(config.get("cache_dir")).absolute()
    redis = urllib.parse.urlparse(config.get("redis_url"))
    py = sys.executable
    # the services find the shared package and each other through PYTHONPATH, also when not pip-installed
    env = {"PYTHONPATH": services_path(), "IMAGESTREAM_HOME": str(home)}

    from imagestream_dev.stack import cassandra, credentials, zipkin

    nodes = cassandra_nodes()
    redis_conf = home / "redis" / "redis.conf"

    def prepare_cassandra(node: cassandra.CassandraNode) -> Callable[[], None]:
        def prepare() -> None:
            credentials.ensure()
            jars = cassandra.ensure_jars(cache / "cassandra")
            cassandra.write_config(node)
            (node.node_dir / "lib").unlink(missing_ok=True)
            (node.node_dir / "lib").symlink_to(jars)

        return prepare

    def prepare_redis() -> None:
        (home / "redis").mkdir(parents=True, exist_ok=True)
        credentials.write_redis_config(redis_conf, redis_settings())

    def prepare_chunk_store() -> None:
        prepare_tls()  # the CA and the certificates, before the first tier starts
        # the administrator's step: keyspace, tables, roles (the service's role may only read and write rows)
        result = subprocess.run([py, "-m", "chunk_store.schema"], capture_output=True, text=True, timeout=300,
                                env={**os.environ, **env, **credentials.schema_env()})
        if result.returncode != 0:
            raise SystemExit(f"chunk_store: the schema step failed: {(result.stderr or result.stdout).strip()}")

    zipkin_port = int(config.get("zipkin_port"))
    zipkin_jar = cache / "zipkin" / f"zipkin-server-{zipkin.ZIPKIN_VERSION}-exec.jar"

    def service_env(name: str) -> dict[str, str]:
        # every service exports its spans to the stack's Zipkin, unless OTEL_* says otherwise
        return {**env, "OTEL_SERVICE_NAME": name}

    return [
        Process(
            "zipkin",
            zipkin.command(zipkin_jar, cassandra.find_java()),
            ("http", f"http://127.0.0.1:{zipkin_port}/health"),
            zipkin.env(zipkin_port),
            start_timeout_s=120,
            prepare=lambda: zipkin.ensure_jar(cache / "zipkin"),
            phase=0,
        ),
        Process(
            "redis",
            # its settings and ACL users in a file only its owner reads: no password on the command line
            ["redis-server", str(redis_conf)],
            ("redis", redis.hostname or "127.0.0.1", redis.port or 6379),
            start_timeout_s=15,
            prepare=prepare_redis,
            phase=0,
        ),
        *(Process(
            cassandra_process_name(i),
            cassandra.command(node, node.node_dir / "lib"),
            ("cql", node.address, node.native_port),
            start_timeout_s=240 * len(nodes),  # nodes of a cluster start side by side on the same cores
            prepare=prepare_cassandra(node),
            phase=0,
        ) for i, node in enumerate(nodes)),
        Process("chunk_store", [py, "-m", "chunk_store"], ("grpc", config.get("chunk_store_listen")),
                service_env("chunk_store"), start_timeout_s=90, prepare=prepare_chunk_store),
        Process("zonal_cache", [py, "-m", "zonal_cache"], ("grpc", config.get("zonal_cache_listen")),
                service_env("zonal_cache"), phase=2),
        Process("node_cache", [py, "-m", "node_cache"], ("grpc", "unix:" + config.node_cache_socket()),
                service_env("node_cache"), phase=3),
        # the node's one FUSE mount: every image that `mount`, `run` and the snapshotter use is a directory of it
        *([Process("fuse_client", [py, "-m", "fuse_client"], ("grpc", "unix:" + config.fuse_socket()),
                   service_env("fuse_client"), phase=4)] if can_mount_fuse() else []),
        # the node agent containerd loads as a proxy snapshotter (docs/containerd.md)
        Process("snapshotter", [py, "-m", "snapshotter"], ("grpc", "unix:" + config.snapshotter_socket()),
                service_env("snapshotter"), phase=5),
    ]


def prepare_tls(log: Callable[[str], None] = lambda _: None) -> None:
    """The CA and every process's certificate (mTLS between the tiers), made once under IMAGESTREAM_TLS_DIR."""
    from imagestream import tls

    if tls.enabled():
        from imagestream_dev.stack import certs

        certs.ensure(log=log)


def redis_settings() -> list[tuple[str, str]]:
    """The local Redis's configuration (besides its ACL users): bound, evicting, not persisted."""
    redis = urllib.parse.urlparse(config.get("redis_url"))
    return [("bind", redis.hostname or "127.0.0.1"), ("port", str(redis.port or 6379)),
            ("protected-mode", "yes"), ("maxmemory", str(config.parse_size(config.get("redis_maxmemory")))),
            ("maxmemory-policy", "allkeys-lru"), ("save", '""'), ("appendonly", "no"),
            ("dir", str(config.home() / "redis"))]


def cassandra_process_name(i: int) -> str:
    return "cassandra" if i == 0 else f"cassandra-{i + 1}"


def cassandra_nodes():  # type: ignore[no-untyped-def]
    """One Cassandra node per address of IMAGESTREAM_CASSANDRA_HOSTS, all on the same ports (one loopback
    address each: 127.0.0.2,127.0.0.3,127.0.0.4 makes a three-node cluster); every node is a seed, tokens
    evenly spaced, so the nodes start side by side without bootstrapping."""
    from imagestream_dev.stack import cassandra, credentials

    home = config.home()
    addresses = config.parse_list(config.get("cassandra_hosts"))
    many = len(addresses) > 1
    storage_port = int(config.get("cassandra_storage_port"))
    return [
        cassandra.CassandraNode(
            cluster_name="imagestream",
            node_dir=home / cassandra_process_name(i),
            address=address,
            native_port=int(config.get("cassandra_port")),
            storage_port=storage_port,
            # JMX listens on 127.0.0.1 whatever the node's address: one port each, 10 apart (the private
            # stacks' other ports sit at offsets 0-14 of their base)
            jmx_port=int(config.get("cassandra_jmx_port")) + 10 * i,
            dc=config.get("cassandra_local_dc"),
            seeds=[f"{a}:{storage_port}" for a in addresses] if many else (),
            initial_token=str(-(2**63) + i * (2**64 // len(addresses))) if many else None,
            heap_mb=512 if many else 768,
            jmx_password_file=credentials.secrets_dir() / "jmx",
        )
        for i, address in enumerate(addresses)
    ]


def nodetool(i: int, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Cassandra's nodetool against the stack's node `i`, run from the same jars."""
    from imagestream_dev.stack import cassandra

    node = cassandra_nodes()[i]
    from imagestream_dev.stack import credentials

    cmd = [cassandra.find_java(), "-Xmx256m", *cassandra._JPMS_FLAGS, "-cp", f"{node.node_dir / 'lib'}/*",
           "-Dlogback.configurationFile=" + cassandra._uri(node.conf_dir / "logback.xml"),
           f"-Dcassandra.logdir={node.log_dir}", "org.apache.cassandra.tools.NodeTool",
           "-h", "127.0.0.1", "-p", str(node.jmx_port),
           "-u", credentials.JMX_USER, "--password-file", str(credentials.jmx_password_file()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def can_mount_fuse() -> bool:
    """Where it cannot, images run by a full pull and the stack has no FUSE client."""
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# -- readiness -------------------------------------------------------------

def is_ready(check: tuple) -> bool:
    kind = check[0]
    try:
        if kind == "redis":
            from imagestream_dev.stack import credentials

            with socket.create_connection((check[1], check[2]), timeout=1) as s:
                secret = credentials.password("redis-admin").encode()
                s.sendall(b"AUTH " + credentials.REDIS_ADMIN.encode() + b" " + secret + b"\r\nPING\r\n")
                reply = b""
                while reply.count(b"\r\n") < 2 and (part := s.recv(64)):
                    reply += part
                return reply == b"+OK\r\n+PONG\r\n"
        if kind == "tcp":
            with socket.create_connection((check[1], check[2]), timeout=1):
                return True
        if kind == "cql":
            from imagestream_dev.stack import cassandra

            cassandra.wait_ready(check[1], check[2], timeout_s=2)
            return True
        if kind == "grpc":
            return grpc_serving(check[1])
        if kind == "http":
            import urllib.request

            with urllib.request.urlopen(check[1], timeout=1) as reply:
                return reply.status == 200
    except (OSError, TimeoutError, RuntimeError):
        return False
    raise ValueError(f"unknown readiness check {check!r}")


def grpc_serving(target: str, timeout_s: float = 1.0) -> bool:
    from imagestream.rpc import healthcheck

    return healthcheck.status(target, timeout_s=timeout_s) == "SERVING"


# -- supervision -----------------------------------------------------------

def _pidfile(name: str) -> pathlib.Path:
    return config.home() / "run" / f"{name}.pid"


def _logfile(name: str) -> pathlib.Path:
    return config.home() / "logs" / f"{name}.log"


def running_pid(name: str) -> int | None:
    try:
        pid = int(_pidfile(name).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(log: Callable[[str], None] = print, only: str | None = None) -> None:
    """Start whatever is not running yet and wait until each is ready. Running it twice is harmless.

    Processes of one `phase` start together (the three backends: their JVMs warm up side by side);
    a phase starts once the one before it is ready.
    """
    home = config.home()
    for d in ("run", "logs"):
        (home / d).mkdir(parents=True, exist_ok=True)
    prepare_tls(log)
    wanted = [p for p in processes() if only is None or p.name == only]
    for phase in sorted({p.phase for p in wanted}):
        started: list[tuple[Process, int, float]] = []
        for proc in (p for p in wanted if p.phase == phase):
            pid = running_pid(proc.name)
            if pid is not None:
                _wait_ready(proc, pid, log)
                log(f"  {proc.name:12} already running (pid {pid})")
                continue
            if proc.ready[0] in ("tcp", "redis", "cql", "http") and is_ready(proc.ready):
                where = proc.ready[1] if len(proc.ready) == 2 else f"{proc.ready[1]}:{proc.ready[2]}"
                raise SystemExit(
                    f"{proc.name}: something not started by this stack already answers at {where}; "
                    f"stop it or choose other ports (IMAGESTREAM_* settings, see README)"
                )
            if proc.prepare is not None:
                proc.prepare()
            with open(_logfile(proc.name), "ab") as out:
                child = subprocess.Popen(
                    proc.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **proc.env}, start_new_session=True,  # survives the CLI, not its Ctrl-C
                )
            _pidfile(proc.name).write_text(str(child.pid))
            started.append((proc, child.pid, time.monotonic()))
        for proc, pid, t0 in started:
            _wait_ready(proc, pid, log)
            log(f"  {proc.name:12} ready in {time.monotonic() - t0:5.1f} s (pid {pid}, log {_logfile(proc.name)})")


def _wait_ready(proc: Process, pid: int, log: Callable[[str], None]) -> None:
    deadline = time.monotonic() + proc.start_timeout_s
    while not is_ready(proc.ready):
        try:
            waited = os.waitpid(pid, os.WNOHANG)
            exited = waited[0] == pid
        except ChildProcessError:
            exited = not alive(pid)
        if exited:
            tail = _tail(_logfile(proc.name))
            raise SystemExit(f"{proc.name} exited before it was ready; last lines of {_logfile(proc.name)}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{proc.name} not ready after {proc.start_timeout_s:.0f} s; see {_logfile(proc.name)}")
        time.sleep(0.25)



def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(log: Callable[[str], None] = print, only: str | None = None) -> None:
    """Stop everything this stack started, last started first (or just the process named `only`)."""
    from fuse_client import mounts

    if only is None:
        for m in mounts.list_mounts():
            mounts.unmount(m.mountpoint)
            log(f"  unmounted {m.mountpoint}")
    for proc in reversed(processes()):
        if only is not None and proc.name != only:
            continue
        pid = running_pid(proc.name)
        if pid is None:
            _pidfile(proc.name).unlink(missing_ok=True)
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
        _pidfile(proc.name).unlink(missing_ok=True)
        log(f"  {proc.name:12} stopped")


def status() -> list[dict]:
    rows = []
    for proc in processes():
        pid = running_pid(proc.name)
        rows.append({"name": proc.name, "pid": pid, "ready": pid is not None and is_ready(proc.ready),
                     "log": str(_logfile(proc.name))})
    return rows


def private_env(home: pathlib.Path, cache_dir: pathlib.Path, port_base: int = 20100) -> dict[str, str]:
    """Settings for a stack of its own (tests, benchmarks): its own home and ports, beside a developer's stack.

    Its ports are port_base to port_base + 19. Keep them below the kernel's ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range, 32768 and up here): a port in that range can be held
    by any outgoing connection at the moment a service wants to listen on it.
    """
    def address(offset: int) -> str:
        return f"127.0.0.1:{port_base + offset}"

    chunk_store, zonal = address(1), address(2)
    return {
        "IMAGESTREAM_HOME": str(home),
        "IMAGESTREAM_CACHE_DIR": str(cache_dir),
        "IMAGESTREAM_DISTRIBUTION_LISTEN": address(0),
        "IMAGESTREAM_CHUNK_STORE_LISTEN": chunk_store,
        "IMAGESTREAM_ZONAL_CACHE_LISTEN": zonal,
        "IMAGESTREAM_ZONAL_UPSTREAMS": chunk_store,
        "IMAGESTREAM_NODE_UPSTREAMS": f"{zonal},{chunk_store}",
        "IMAGESTREAM_REGION": chunk_store,
        "IMAGESTREAM_REDIS_URL": f"redis://{address(3)}/0",
        "IMAGESTREAM_CASSANDRA_PORT": str(port_base + 4),
        "IMAGESTREAM_CASSANDRA_STORAGE_PORT": str(port_base + 5),
        "IMAGESTREAM_CASSANDRA_JMX_PORT": str(port_base + 6),
        "IMAGESTREAM_ZIPKIN_PORT": str(port_base + 7),
        "IMAGESTREAM_CHUNK_STORE_METRICS": address(11),
        "IMAGESTREAM_ZONAL_CACHE_METRICS": address(12),
        "IMAGESTREAM_NODE_CACHE_METRICS": address(13),
        "IMAGESTREAM_SNAPSHOTTER_METRICS": address(14),
    }


def empty_caches(log: Callable[[str], None] = lambda _: None) -> None:
    """Empty the node cache (memory and disk) and the zonal cache, keeping the regional store: a cold node.

    The node's FUSE client restarts too: it keeps the indexes of the images it knows, and the kernel
    their pages."""
    node = [p.name for p in processes() if p.name == "fuse_client"] + ["node_cache"]
    for name in (*node, "zonal_cache"):
        down(log, only=name)
    shutil.rmtree(config.node_disk_dir(), ignore_errors=True)
    from imagestream_dev.stack import credentials

    client = credentials.redis_admin()
    client.flushall()
    client.close()
    for name in ("zonal_cache", *reversed(node)):
        up(log, only=name)


def reset() -> None:
    """Remove all state (data, caches of the tiers, logs). The stack must be down."""
    if any(running_pid(p.name) for p in processes()):
        raise SystemExit("stop the stack first: imagestream stack down")
    shutil.rmtree(config.home(), ignore_errors=True)


def named(name: str) -> Process:
    """The process called `name` in the definition."""
    found = {p.name: p for p in processes()}
    if name not in found:
        raise SystemExit(f"no process {name!r} in the local stack; there are: {', '.join(found)}")
    return found[name]


def main(argv: list[str] | None = None) -> None:
    """The definition for tools that run the stack themselves (the Tiltfile's local branch).

    With no option, print every process as JSON: name, command, readiness check, environment, and its
    start phase where the definition has phases (processes of one phase may start together).
    `--prepare NAME` runs NAME's one-time set-up (Cassandra: jars and configuration), if it has one;
    `--check NAME` exits 0 when NAME passes its readiness check, 1 otherwise.
    """
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python -m imagestream_dev.stack.local", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prepare", metavar="NAME", help="run the one-time set-up of process NAME")
    action.add_argument("--check", metavar="NAME", help="exit 0 if process NAME is ready")
    args = parser.parse_args(argv)
    if args.check:
        ready = is_ready(named(args.check).ready)
        print(f"{args.check}: {'ready' if ready else 'not ready'}")
        sys.exit(0 if ready else 1)
    if args.prepare:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # jar downloads report progress
        proc = named(args.prepare)
        if proc.prepare is not None:
            proc.prepare()
        return
    print(json.dumps([{**p.describe(), "phase": getattr(p, "phase", None)} for p in processes()], indent=2))


if __name__ == "__main__":  # `python -m imagestream_dev.stack.local` prints the definition (used by the Tiltfile)
    main()
