"""The local stack's tracing backend: Zipkin's server (UI and query API), from Maven Central.

One executable jar (`io.zipkin:zipkin-server:<version>:exec`) run on the
machine's Java with in-memory storage. The services export spans to it in
Zipkin's JSON format (OTEL_TRACES_EXPORTER=zipkin).
"""

from __future__ import annotations

import fcntl
import pathlib
import shutil
import subprocess

ZIPKIN_VERSION = "3.5.1"


def ensure_jar(cache_dir: pathlib.Path) -> pathlib.Path:
    """The server jar under cache_dir, fetched with Maven once (file-locked, renamed into place when whole)."""
    cache_dir = pathlib.Path(cache_dir).resolve()
    jar = cache_dir / f"zipkin-server-{ZIPKIN_VERSION}-exec.jar"
    if jar.exists():
        return jar
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jar.exists():
            return jar
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("zipkin: 'mvn' not found on PATH (apt-get install maven)")
        partial = cache_dir / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            [mvn, "-B", "-q", f"-Dmaven.repo.local={cache_dir / 'm2'}", "dependency:copy",
             f"-Dartifact=io.zipkin:zipkin-server:{ZIPKIN_VERSION}:jar:exec", f"-DoutputDirectory={partial}"],
            capture_output=True, text=True,
        )
        fetched = partial / jar.name
        if result.returncode != 0 or not fetched.exists():
            raise RuntimeError(f"zipkin: mvn could not fetch the server jar:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        fetched.rename(jar)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(cache_dir / "m2", ignore_errors=True)  # the jar is all we keep
    return jar


def command(jar: pathlib.Path, java: str) -> list[str]:
    # a wedged JVM would keep the port and answer nothing: out of memory, it exits (and `stack up` restarts it)
    return [java, "-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
            "-Dlogging.level.root=WARN",
            # on loopback only (its default is every interface); a list given here replaces the jar's whole list
            "-Darmeria.ports[0].ip=127.0.0.1", "-Darmeria.ports[0].port=${QUERY_PORT}",
            "-Darmeria.ports[0].protocols[0]=http", "-jar", str(jar)]


def env(port: int) -> dict[str, str]:
    return {"STORAGE_TYPE": "mem", "QUERY_PORT": str(port), "MEM_MAX_SPANS": "100000",  # ~3 KB of heap each: ~300 MB, fits -Xmx512m
            "COLLECTOR_ACTIVEMQ_ENABLED": "false", "COLLECTOR_KAFKA_ENABLED": "false",
            "COLLECTOR_RABBITMQ_ENABLED": "false", "COLLECTOR_SCRIBE_ENABLED": "false"}
