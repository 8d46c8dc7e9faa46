"""Run a real Apache Cassandra node from Maven Central jars (no tarball, no Docker).

What it took on this machine (Debian 12, 2 cores, OpenJDK 17.0.15, Maven 3.8.7; 2026-11-27):

* Jars: ``cassandra_pom.xml`` + ``mvn dependency:copy-dependencies`` (maven-dependency-plugin
  pinned to 3.8.1): org.apache.cassandra:cassandra-all:5.0.9 (newest 5.0.x served) plus its
  runtime deps, 100 jars / 67 MB (m2 repo 83 MB), 39-44 s cold. Nothing had to be excluded:
  5.0.9 uses netty 4.1.130.Final, whose native epoll jars ARE served (the linux-x86_64
  ones of 4.1.138/4.1.140 are not: on a bump that hits them, exclude
  io.netty:netty-transport-native-epoll in the pom; :func:`command` then adds
  -Dcassandra.native.epoll.enabled=false by itself). provided-scope deps (antlr, byteman,
  ACCP) are not copied and not needed. mvn's "The POM for
  org.perfkit.sjk.parsers:sjk-jfr5:jar:0.5 is invalid" warnings are harmless. Logging is
  logback 1.5 (not 1.2).
* Java: 5.0 runs on Java 11/17 only; :func:`find_java` picks a 17 (or 11) JDK even when
  JAVA_HOME points at the Java 25 also installed here. Java 17 needs the --add-exports /
  --add-opens list of Cassandra's conf/jvm17-server.options (``_JPMS_FLAGS``) and
  -Djdk.attach.allowAttachSelf=true. No jamm -javaagent (5.0 runs fine without it).
* No config ships in the jar: we write cassandra.yaml, logback.xml and
  cassandra-rackdc.properties; -Dcassandra.config etc. must be file:// URIs. Don't give
  logback a <shutdownHook>: it races Cassandra's drain and the shutdown log is lost.
* Big blobs: commitlog_segment_size 64MiB gives max_mutation_size 32MiB (default segment
  32MiB -> 16 MiB mutations). Also needed: native_transport_max_message_size, whose default
  is heap/40 ("CQL Message of size 20971587 bytes exceeds allowed maximum of 20132659
  bytes" for a 20 MiB blob at 768 MiB heap); it may not exceed
  native_transport_max_request_data_in_flight_per_ip. Checked: 20 and 31 MiB blobs go
  through with protocol V4 and V5; 33 MiB gets "Rejected an oversized mutation".
* Start-up is CPU-bound (~16 s CPU on 2 cores). What helped: AppCDS archive in the jar
  cache (-27% CPU; the first run that exits on SIGTERM writes it, its stop takes ~6 s
  longer), -Dcassandra.memtable.row_overhead_size (skips a ~1.5 s measurement),
  num_tokens 1, auto_bootstrap false, skip_wait_for_gossip_to_settle=0. -Xms256m: the
  daemon mlockall()s (succeeds as root), faulting in the whole initial heap, so
  -Xms=-Xmx=768m meant 1.17 GB RSS at start vs ~650 MB now. -XX:TieredStopAtLevel=1
  saved CPU but no wall time, so not used. shutdown_announce_in_ms=500 trims SIGTERM stop
  (drain) to 3-5 s. The JVM exits 143 on SIGTERM after a clean drain.
* Measured (on a busy 2-core machine, load 3-6): start-to-ready 7-10 s
  with the CDS archive (fresh or existing data dir; 11 s without it, ~20 s for the run
  that records it), RSS ~650 MB at ready, ~720 MB after 2+20 MiB blob round-trips.

Usage::

    lib = ensure_jars(Path(".cache/cassandra"))
    node = CassandraNode("imagestream", Path("/tmp/cass"))
    write_config(node)
    proc = start(node, lib)
    wait_ready(node.address, node.native_port, 120, log_file=node.log_file, process=proc)
    ...
    stop(proc)

Debug: ``PYTHONPATH=services python -m imagestream_dev.stack.cassandra --state-dir DIR
--cache-dir .cache/cassandra`` runs a node in the foreground (exec).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional, Sequence

__all__ = [
    "CASSANDRA_VERSION",
    "CassandraNode",
    "ensure_jars",
    "write_config",
    "command",
    "find_java",
    "start",
    "stop",
    "wait_ready",
]

log = logging.getLogger(__name__)

CASSANDRA_VERSION = "5.0.9"
POM = pathlib.Path(__file__).with_name("cassandra_pom.xml")
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
_STAMP = ".complete"


# --------------------------------------------------------------------------- jars


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _jars_complete(lib: pathlib.Path, digest: str) -> bool:
    stamp = lib / _STAMP
    try:
        return stamp.read_text().strip() == digest and any(lib.glob("cassandra-all-*.jar"))
    except OSError:
        return False


def ensure_jars(cache_dir: pathlib.Path) -> pathlib.Path:
    """Return ``cache_dir/lib`` holding Cassandra's jars, running Maven only if needed.

    Idempotent and safe to call from several processes at once (file lock). The Maven
    local repository is ``cache_dir/m2`` so the whole download lives in one folder.
    ``lib/.complete`` holds the pom's sha256: a half-finished download, or a changed pom,
    is fetched again (into ``lib.partial`` and then renamed, so ``lib`` is never half full).
    """
    cache_dir = pathlib.Path(cache_dir).resolve()
    lib = cache_dir / "lib"
    digest = _pom_digest()
    if _jars_complete(lib, digest):
        return lib
    with _locked(cache_dir / ".lock"):
        if _jars_complete(lib, digest):
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("ensure_jars: 'mvn' not found on PATH (apt-get install maven)")
        partial = cache_dir / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        mvn_log = cache_dir / "mvn.log"
        cmd = [
            mvn, "-B", "-q",
            "-f", str(POM),
            f"-Dmaven.repo.local={cache_dir / 'm2'}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
        ]
        log.info("fetching Cassandra %s jars into %s", CASSANDRA_VERSION, lib)
        t0 = time.monotonic()
        with open(mvn_log, "wb") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cache_dir,
                                 stdin=subprocess.DEVNULL)
        if rc != 0 or not any(partial.glob("cassandra-all-*.jar")):
            tail = mvn_log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mvn failed (exit {rc}), see {mvn_log}:\n{tail}")
        (partial / _STAMP).write_text(digest + "\n")
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        log.info("fetched %d jars in %.1fs", len(list(lib.glob("*.jar"))), time.monotonic() - t0)
        return lib


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class CassandraNode:
    """One node's settings; all its state (conf, data, logs) lives under ``node_dir``."""

    cluster_name: str
    node_dir: pathlib.Path
    address: str = "127.0.0.1"
    native_port: int = 9042
    storage_port: int = 7000
    jmx_port: int = 7199
    dc: str = "dc1"
    rack: str = "rack1"
    heap_mb: int = 768
    # Initial heap. Cassandra mlockall()s the JVM at start (it succeeds as root), which
    # faults in the whole initial heap: -Xms = -Xmx would make RSS >= heap_mb at once.
    heap_min_mb: int = 256
    processors: int = 2
    # AppCDS archive of Cassandra's classes, made by the first run that exits cleanly
    # (kept in the jar cache; see _cds_flags). Cuts start-up CPU by about a third.
    class_data_sharing: bool = True
    # Seeds as "host" or "host:port"; empty means this node seeds itself.
    seeds: Sequence[str] = ()
    num_tokens: int = 1
    initial_token: Optional[str] = None
    # 'group': a write is acknowledged once it is on disk; 'periodic': up to 10 s of acknowledged writes can be lost
    commitlog_sync: str = "group"
    # JMX (nodetool) on loopback, authenticated with this password file ("user password") and the access
    # file beside it (NAME.access); None: no JMX at all
    jmx_password_file: Optional[pathlib.Path] = None

    def __post_init__(self) -> None:
        self.node_dir = pathlib.Path(self.node_dir).resolve()

    @property
    def conf_dir(self) -> pathlib.Path:
        return self.node_dir / "conf"

    @property
    def data_dir(self) -> pathlib.Path:
        return self.node_dir / "data"

    @property
    def log_dir(self) -> pathlib.Path:
        return self.node_dir / "logs"

    @property
    def log_file(self) -> pathlib.Path:
        """Cassandra's own log (logback)."""
        return self.log_dir / "system.log"

    @property
    def stdout_file(self) -> pathlib.Path:
        """JVM stdout/stderr when started with :func:`start` (JVM crashes land here)."""
        return self.log_dir / "stdout.log"


def _q(value: object) -> str:
    """YAML single-quoted scalar."""
    return "'" + str(value).replace("'", "''") + "'"


def _yaml(node: CassandraNode) -> str:
    d = node.data_dir
    seeds = ",".join(node.seeds) if node.seeds else f"{node.address}:{node.storage_port}"
    token = f"initial_token: {_q(node.initial_token)}\n" if node.initial_token else ""
    return f"""\
# Written by imagestream_dev.stack.cassandra (Cassandra {CASSANDRA_VERSION}); edits are overwritten.
cluster_name: {_q(node.cluster_name)}
num_tokens: {node.num_tokens}
{token}partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: GossipingPropertyFileSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: {_q(seeds)}
listen_address: {node.address}
rpc_address: {node.address}
storage_port: {node.storage_port}
native_transport_port: {node.native_port}
start_native_transport: true

data_file_directories:
  - {_q(d / 'data')}
commitlog_directory: {_q(d / 'commitlog')}
saved_caches_directory: {_q(d / 'saved_caches')}
hints_directory: {_q(d / 'hints')}
cdc_raw_directory: {_q(d / 'cdc_raw')}

# Image indexes are stored as single blobs: mutations up to 32 MiB
# (max_mutation_size defaults to half the segment size; spelled out anyway).
commitlog_segment_size: 64MiB
max_mutation_size: 32MiB
native_transport_max_frame_size: 64MiB
# A CQL request above max_message_size is refused ("CQL Message of size 20971587 bytes
# exceeds allowed maximum of 20132659 bytes"); its default is the per-IP in-flight limit,
# heap/40 (19.2 MiB at 768 MiB heap); keep it below the per-IP in-flight limit.
native_transport_max_message_size: 48MiB
native_transport_max_request_data_in_flight_per_ip: 96MiB
native_transport_max_request_data_in_flight: {max(node.heap_mb // 5, 96)}MiB
# Durability of an acknowledged write (see docs/durability.md): 'group' fsyncs the commit log
# at most every 15 ms and answers a write only after its fsync, so an acknowledged write
# survives a crash or power loss of the node; 'periodic' (Cassandra's default, 10 s)
# acknowledges before the fsync and can lose the last 10 s of writes of a node that crashes.
{_commitlog(node)}
commitlog_total_space: 1024MiB

# Small machine, fast start, new 5.0-only cluster.
auto_bootstrap: false
auto_snapshot: false
storage_compatibility_mode: NONE
concurrent_compactors: 1
disk_failure_policy: stop
commit_failure_policy: stop
# Logins with a password; every statement checked against the role's permissions (roles and grants are
# made by the schema step, chunk_store/schema.py, which also replaces the default superuser).
authenticator: PasswordAuthenticator
authorizer: CassandraAuthorizer
role_manager: CassandraRoleManager
"""


def _commitlog(node: CassandraNode) -> str:
    if node.commitlog_sync == "group":
        return "commitlog_sync: group\ncommitlog_sync_group_window: 15ms"
    if node.commitlog_sync == "periodic":
        return "commitlog_sync: periodic\ncommitlog_sync_period: 10000ms"
    raise ValueError(f"commitlog_sync {node.commitlog_sync!r}: want 'group' or 'periodic'")


def _logback(node: CassandraNode) -> str:
    return """\
<configuration scan="false" debug="false">
  <!-- Written by imagestream_dev.stack.cassandra. ${cassandra.logdir} is a JVM system property. -->
  <!-- no <shutdownHook>: Cassandra stops logback itself after draining; a logback hook
       would race it and lose the shutdown log lines. -->
  <appender name="SYSTEMLOG" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>${cassandra.logdir}/system.log.%i.zip</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>5</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>50MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter">
      <level>${cassandra.console_log_level:-INFO}</level>
    </filter>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="SYSTEMLOG"/>
    <appender-ref ref="STDOUT"/>
  </root>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.thinkaurelius.thrift" level="ERROR"/>
</configuration>
"""


def write_config(node: CassandraNode) -> None:
    """Write conf/{cassandra.yaml,logback.xml,cassandra-rackdc.properties}; make data/, logs/."""
    for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw"):
        (node.data_dir / sub).mkdir(parents=True, exist_ok=True)
    node.log_dir.mkdir(parents=True, exist_ok=True)
    (node.conf_dir / "triggers").mkdir(parents=True, exist_ok=True)
    files = {
        "cassandra.yaml": _yaml(node),
        "logback.xml": _logback(node),
        "cassandra-rackdc.properties": f"dc={node.dc}\nrack={node.rack}\nprefer_local=true\n",
    }
    for name, text in files.items():
        path = node.conf_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# --------------------------------------------------------------------------- command line

# From Cassandra 5.0 conf/jvm17-server.options (JPMS). java.io is the one whose absence
# kills startup early (NativeLibrary's static initialiser); the rest are used later.
_JPMS_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    *(
        f"--add-exports={m}=ALL-UNNAMED"
        for m in (
            "java.base/jdk.internal.misc",
            "java.management.rmi/com.sun.jmx.remote.internal.rmi",
            "java.management/com.sun.jmx.remote.security",  # JMX's file login (authenticated JMX)
            "java.rmi/sun.rmi.registry",
            "java.rmi/sun.rmi.server",
            "java.sql/java.sql",
            "java.base/java.lang.ref",
            "jdk.unsupported/sun.misc",
            "jdk.compiler/com.sun.tools.javac.file",
            "jdk.attach/sun.tools.attach",
        )
    ),
    *(
        f"--add-opens={m}=ALL-UNNAMED"
        for m in (
            "java.base/java.lang.module",
            "java.base/jdk.internal.loader",
            "java.base/jdk.internal.ref",
            "java.base/jdk.internal.reflect",
            "java.base/jdk.internal.math",
            "java.base/jdk.internal.module",
            "java.base/jdk.internal.util.jar",
            "jdk.management/com.sun.management.internal",
            "java.base/sun.nio.ch",
            "java.base/java.io",
            "java.base/java.lang.reflect",
            "jdk.compiler/com.sun.tools.javac",
            "java.base/java.lang",
            "java.base/java.util",
            "java.base/java.nio",
        )
    ),
]

_SUPPORTED_JAVA = (17, 11)


def _java_major(java_home: pathlib.Path) -> Optional[int]:
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return None
    m = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.M)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def find_java() -> str:
    """Path of a Java 17 (or 11) ``java``: Cassandra 5.0 supports no other.

    Order: $CASSANDRA_JAVA_HOME, $JAVA_HOME, ``java`` on PATH, /usr/lib/jvm/*.
    """
    homes: list[pathlib.Path] = []
    for var in ("CASSANDRA_JAVA_HOME", "JAVA_HOME"):
        if os.environ.get(var):
            homes.append(pathlib.Path(os.environ[var]))
    on_path = shutil.which("java")
    if on_path:
        homes.append(pathlib.Path(on_path).resolve().parent.parent)
    jvm = pathlib.Path("/usr/lib/jvm")
    if jvm.is_dir():
        homes.extend(sorted(p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink()))
    seen = []
    for want in _SUPPORTED_JAVA:
        for home in homes:
            major = _java_major(home)
            seen.append(f"{home} ({major})")
            if major == want and (home / "bin" / "java").exists():
                return str(home / "bin" / "java")
    raise RuntimeError(
        "Cassandra 5.0 needs Java 17 or 11; none found (set CASSANDRA_JAVA_HOME). Looked at: "
        + ", ".join(dict.fromkeys(seen))
    )


def _uri(path: pathlib.Path) -> str:
    return path.resolve().as_uri()


def _cds_key(java: str, lib_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    java_home = pathlib.Path(java).resolve().parent.parent
    h.update(str(java_home).encode())
    with contextlib.suppress(OSError):
        h.update((java_home / "release").read_bytes())
    for jar in sorted(lib_dir.glob("*.jar")):
        h.update(f"{jar.name}:{jar.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _cds_archive_ok(java: str, archive: pathlib.Path, lib_dir: pathlib.Path) -> bool:
    """True if the JVM maps ``archive`` with this classpath (-Xshare:on fails otherwise)."""
    try:
        return subprocess.run(
            [java, "-Xshare:on", f"-XX:SharedArchiveFile={archive}", "-cp", f"{lib_dir}/*",
             "-version"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=60,
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _cds_flags(java: str, lib_dir: pathlib.Path) -> list[str]:
    """Use the AppCDS archive for (java, jars) if there is one, else ask this run to dump it.

    The JVM writes a dynamic archive (-XX:ArchiveClassesAtExit, ~60 MB) when it exits
    normally, e.g. on SIGTERM, not on SIGKILL; that stop takes a few seconds longer. Each
    run dumps to its own file; a later call checks one with -Xshare:on before renaming it
    into place, so a half-written or foreign archive is never used. With the default
    -Xshare:auto a JVM that cannot map an archive just runs without it.
    """
    if os.environ.get("IMAGESTREAM_CASSANDRA_CDS", "1") == "0":
        return []
    cds_dir = lib_dir.parent / "cds"
    key = _cds_key(java, lib_dir)
    final = cds_dir / f"cassandra-{key}.jsa"
    if final.is_file():
        return [f"-XX:SharedArchiveFile={final}"]
    try:
        cds_dir.mkdir(parents=True, exist_ok=True)
        for cand in sorted(cds_dir.glob(f"cassandra-{key}.*.dump")):
            if _cds_archive_ok(java, cand, lib_dir):
                os.replace(cand, final)
                for rest in cds_dir.glob(f"cassandra-{key}.*.dump"):
                    rest.unlink(missing_ok=True)
                return [f"-XX:SharedArchiveFile={final}"]
            if time.time() - cand.stat().st_mtime > 600:
                cand.unlink(missing_ok=True)
        if not os.access(cds_dir, os.W_OK):
            return []
    except OSError:
        return []
    dump = cds_dir / f"cassandra-{key}.{os.getpid()}-{time.monotonic_ns()}.dump"
    # -Xlog: the dump prints ~200 harmless "[warning][cds] Skipping ..." lines otherwise.
    return [f"-XX:ArchiveClassesAtExit={dump}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"]


def _jmx_flags(node: CassandraNode) -> list[str]:
    """JMX on loopback only (Cassandra's "local" JMX server), with a login; none when no password file is given."""
    if node.jmx_password_file is None:
        return []
    password = pathlib.Path(node.jmx_password_file).resolve()
    return [f"-Dcassandra.jmx.local.port={node.jmx_port}",
            "-Dcom.sun.management.jmxremote.authenticate=true",
            f"-Dcom.sun.management.jmxremote.password.file={password}",
            f"-Dcom.sun.management.jmxremote.access.file={password.with_name(password.name + '.access')}"]


def command(node: CassandraNode, lib_dir: pathlib.Path, java: Optional[str] = None) -> list[str]:
    """The full ``java`` command line that runs ``node`` with the jars in ``lib_dir``."""
    lib_dir = pathlib.Path(lib_dir).resolve()
    conf = node.conf_dir
    java_bin = java or find_java()
    cmd = [
        java_bin,
        # jvm-server.options
        "-ea",
        "-da:net.openhft...",
        f"-Xms{min(node.heap_min_mb, node.heap_mb)}m",
        f"-Xmx{node.heap_mb}m",
        "-Xss256k",
        f"-XX:ActiveProcessorCount={node.processors}",
        "-XX:+UseTLAB",
        "-XX:+ResizeTLAB",
        "-XX:+PerfDisableSharedMem",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.net.preferIPv4Stack=true",
        # jvm17-server.options: G1 + JPMS + netty
        "-XX:+UseG1GC",
        "-XX:+ParallelRefProcEnabled",
        "-XX:MaxTenuringThreshold=1",
        "-XX:G1RSetUpdatingPauseTimePercent=5",
        "-XX:MaxGCPauseMillis=300",
        "-XX:InitiatingHeapOccupancyPercent=70",
        *_JPMS_FLAGS,
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Dio.netty.allocator.useCacheForAllThreads=true",
        "-Dio.netty.allocator.maxOrder=11",
        # what bin/cassandra + cassandra-env.sh would set
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config={_uri(conf / 'cassandra.yaml')}",
        f"-Dcassandra-rackdc.properties={_uri(conf / 'cassandra-rackdc.properties')}",
        f"-Dlogback.configurationFile={_uri(conf / 'logback.xml')}",
        f"-Dcassandra.logdir={node.log_dir}",
        f"-Dcassandra.storagedir={node.data_dir}",
        f"-Dcassandra.triggers_dir={conf / 'triggers'}",
        *_jmx_flags(node),
        # fast start for a small local cluster
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.load_ring_state=false",
        "-Dcassandra.superuser_setup_delay_ms=0",
        # Skips measuring the memtable row overhead at start (~1.5 s of CPU on the main
        # thread); 180/181 bytes is what it measures with these flags, with or without jamm.
        "-Dcassandra.memtable.row_overhead_size=180",
        # SIGTERM drains; the gossip shutdown announcement then sleeps 2 s by default.
        "-Dcassandra.shutdown_announce_in_ms=500",
    ]
    # No -javaagent:jamm-0.4.0.jar (bin/cassandra adds it): 5.0 sizes objects without it,
    # and with it an AppCDS dump needs -XX:+AllowArchivingWithJavaAgent, after which every
    # start prints a "should be used for testing purposes only" JVM warning.
    if node.class_data_sharing:
        cmd += _cds_flags(java_bin, lib_dir)
    if not any(lib_dir.glob("netty-transport-native-epoll-*linux-x86_64.jar")):
        cmd.append("-Dcassandra.native.epoll.enabled=false")
    cmd += ["-cp", f"{lib_dir}/*", MAIN_CLASS]
    return cmd


# --------------------------------------------------------------------------- run / wait


def start(node: CassandraNode, lib_dir: pathlib.Path) -> subprocess.Popen:
    """Start ``node`` in the background (own session), stdout/stderr to ``node.stdout_file``.

    ``write_config(node)`` must have been called. Raises RuntimeError if the node's native
    or storage port already accepts connections.
    """
    # Another node (or leftover JVM) on our ports would answer wait_ready() in our place.
    for port in (node.native_port, node.storage_port):
        if _port_open(node.address, port):
            raise RuntimeError(
                f"{node.address}:{port} is already in use; is another Cassandra running?"
            )
    cmd = command(node, lib_dir)
    node.log_dir.mkdir(parents=True, exist_ok=True)
    with open(node.stdout_file, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=node.node_dir,
            start_new_session=True,
            env={**os.environ, "CASSANDRA_CONF": str(node.conf_dir)},
        )


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (Cassandra drains and exits), then SIGKILL after ``timeout_s``. Returns rc."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("Cassandra pid %d ignored SIGTERM for %.0fs; killing", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
    return proc.returncode


_DRIVER_LOGGERS = ("cassandra", "cassandra.cluster", "cassandra.connection", "cassandra.pool",
                   "cassandra.policies", "cassandra.io.asyncorereactor",
                   "cassandra.io.libevreactor")


@contextlib.contextmanager
def _quiet_driver() -> Iterator[None]:
    saved = {}
    for name in _DRIVER_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def _query_release(address: str, port: int) -> str:
    from cassandra import AuthenticationFailed, ProtocolVersion
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.policies import WhiteListRoundRobinPolicy

    # Whitelist: in a multi-node cluster system.local must be asked of *this* node.
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([address]), request_timeout=5
    )
    cluster = Cluster(
        [address],
        port=port,
        protocol_version=ProtocolVersion.V5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=3,
        control_connection_timeout=3,
    )
    try:
        try:
            session = cluster.connect()
        except NoHostAvailable as e:
            # a node that asks for a login serves CQL: it is ready (its roles are the schema step's business)
            if any(isinstance(x, AuthenticationFailed) for x in e.errors.values()):
                return "(login required)"
            raise
        row = session.execute("SELECT release_version FROM system.local").one()
        return row.release_version
    finally:
        cluster.shutdown()


def wait_ready(
    address: str,
    port: int,
    timeout_s: float,
    *,
    log_file: Optional[pathlib.Path] = None,
    process: Optional[subprocess.Popen] = None,
) -> None:
    """Block until ``SELECT release_version FROM system.local`` answers on address:port.

    Raises TimeoutError after ``timeout_s`` (naming ``log_file``), or RuntimeError at once
    if ``process`` exits meanwhile. Driver log noise is silenced while polling.
    """
    where = str(log_file) if log_file else "the node's logs/system.log and logs/stdout.log"
    deadline = time.monotonic() + timeout_s
    last_error: object = "port closed"
    with _quiet_driver():
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"Cassandra exited with code {process.returncode} before it was ready on "
                    f"{address}:{port}; see {where}"
                )
            if _port_open(address, port):
                try:
                    version = _query_release(address, port)
                    log.info("Cassandra %s ready on %s:%d", version, address, port)
                    return
                except Exception as exc:  # noqa: BLE001 - any driver error means "not yet"
                    last_error = exc
            else:
                last_error = "port closed"
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Cassandra on {address}:{port} not ready after {timeout_s:.0f}s "
                    f"(last error: {last_error}); see {where}"
                )
            time.sleep(0.25)


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m imagestream_dev.stack.cassandra",
        description="Fetch Cassandra jars, write config, run one node in the foreground.",
    )
    p.add_argument("--state-dir", required=True, type=pathlib.Path,
                   help="node_dir (conf, data, logs)")
    p.add_argument("--cache-dir", required=True, type=pathlib.Path,
                   help="jar cache (e.g. .cache/cassandra)")
    p.add_argument("--cluster-name", default="imagestream")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--native-port", type=int, default=9042)
    p.add_argument("--storage-port", type=int, default=7000)
    p.add_argument("--jmx-port", type=int, default=7199)
    p.add_argument("--dc", default="dc1")
    p.add_argument("--rack", default="rack1")
    p.add_argument("--heap-mb", type=int, default=768)
    p.add_argument("--print-command", action="store_true", help="print the java command and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lib = ensure_jars(args.cache_dir)
    node = CassandraNode(
        cluster_name=args.cluster_name,
        node_dir=args.state_dir,
        address=args.address,
        native_port=args.native_port,
        storage_port=args.storage_port,
        jmx_port=args.jmx_port,
        dc=args.dc,
        rack=args.rack,
        heap_mb=args.heap_mb,
    )
    write_config(node)
    cmd = command(node, lib)
    if args.print_command:
        print(" ".join(cmd))
        return
    print(f"log: {node.log_file}", file=sys.stderr, flush=True)
    os.chdir(node.node_dir)
    os.environ["CASSANDRA_CONF"] = str(node.conf_dir)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
