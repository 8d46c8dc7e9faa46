"""Every setting in one place. Each can be given as a flag or as an environment
variable with the prefix IMAGESTREAM_ (flag --redis-url <-> IMAGESTREAM_REDIS_URL).

Services build their argument parsers from these definitions and the CLI reads
the same ones, so a setting has one name, one default and one meaning everywhere.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # only services parse arguments; a container start does not import argparse
    import argparse

PREFIX = "IMAGESTREAM_"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9}


def parse_size(text: str | int) -> int:
    """'256MiB' -> 268435456. Bare numbers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512KiB, 256MiB, 10GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_list(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


class Setting(NamedTuple):  # read on every container start: no `dataclasses` (it imports `inspect`)
    name: str  # flag name without dashes, snake_case
    default: str
    help: str

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self) -> str:
        return os.environ.get(self.env, self.default)


SETTINGS = {s.name: s for s in [
    # where things live
    Setting("home", ".imagestream", "state folder of the local stack: data, logs, sockets, mounts"),
    Setting("cache_dir", ".cache", "downloads kept between runs: Cassandra jars, debootstrap trees, images"),
    # regional chunk store (Cassandra)
    Setting("chunk_store_listen", "127.0.0.1:50061", "address the regional chunk store serves gRPC on"),
    Setting("chunk_store_metrics", "127.0.0.1:9461", "address of the regional chunk store's Prometheus /metrics"),
    Setting("distribution_listen", "127.0.0.1:50060",
            "address the regional chunk store serves the OCI Distribution API (read side, HTTP) on; '' for none"),
    Setting("cassandra_hosts", "127.0.0.1", "Cassandra contact points, comma-separated"),
    Setting("cassandra_port", "9042", "Cassandra native protocol port"),
    Setting("cassandra_storage_port", "7000", "Cassandra inter-node port (local stack only)"),
    Setting("cassandra_jmx_port", "7199", "Cassandra JMX port for nodetool (local stack only)"),
    Setting("cassandra_keyspace", "imagestream", "keyspace holding chunks, indexes and names"),
    Setting("cassandra_replication", "dc1:1", "NetworkTopologyStrategy replication, e.g. 'dc1:3,dc2:3'"),
    Setting("cassandra_local_dc", "dc1", "data centre the regional store prefers"),
    Setting("cassandra_username", "chunk_store", "Cassandra role the regional store logs in as (SELECT and MODIFY on its keyspace only)"),
    Setting("cassandra_password_file", "", "file holding that role's password (default: HOME/secrets/cassandra-chunk-store)"),
    Setting("cassandra_admin_username", "imagestream_admin",
            "Cassandra superuser of the schema step (python -m chunk_store.schema), which replaces the default 'cassandra' role"),
    Setting("cassandra_admin_password_file", "", "file holding the superuser's password (default: HOME/secrets/cassandra-admin)"),
    Setting("read_consistency", "LOCAL_QUORUM", "Cassandra consistency level for reads"),
    Setting("write_consistency", "LOCAL_QUORUM", "Cassandra consistency level for writes"),
    Setting("scrub_interval", "0", "seconds between background scrubs of every regional chunk (0: none)"),
    Setting("gc_interval", "0", "seconds between background garbage collections of the regional store (0: none)"),
    Setting("gc_grace", "3600",
            "seconds gc keeps an unreferenced chunk or blob after a push wrote or found it (a push under way)"),
    # zonal cache (Redis)
    Setting("zonal_cache_listen", "127.0.0.1:50062", "address the zonal cache serves gRPC on"),
    Setting("zonal_cache_metrics", "127.0.0.1:9462", "address of the zonal cache's Prometheus /metrics"),
    Setting("redis_url", "redis://127.0.0.1:6390/0", "Redis behind the zonal cache"),
    Setting("redis_username", "zonal-cache", "Redis ACL user of the zonal cache (chunk keys only; Redis's default user is off)"),
    Setting("redis_password_file", "", "file holding that user's password (default: HOME/secrets/redis-zonal-cache)"),
    Setting("redis_maxmemory", "256MiB", "Redis maxmemory set by the local stack (evicts allkeys-lru)"),
    Setting("zonal_upstreams", "127.0.0.1:50061", "upstreams of the zonal cache, in order (regional stores)"),
    # node cache
    Setting("node_cache_socket", "", "Unix socket of the node cache (default: HOME/node-cache.sock)"),
    Setting("node_upstreams", "127.0.0.1:50062,127.0.0.1:50061",
            "upstreams of the node cache, in order: zonal cache first, regional store as fallback"),
    Setting("node_cache_metrics", "127.0.0.1:9463", "address of the node cache's Prometheus /metrics"),
    Setting("node_memory_bytes", "256MiB",
            "the node's memory reservation for chunks: the FUSE client's share, the node cache's memory tier the rest"),
    Setting("fuse_cache_bytes", "",
            "the FUSE client's share of the node's memory reservation: decompressed chunks, shared by every image "
            "(default: an eighth of it, 32MiB of 256MiB)"),
    Setting("node_disk_bytes", "20GiB", "bound of the node's on-disk chunk cache"),
    Setting("node_disk_dir", "", "on-disk chunk cache folder (default: HOME/node-cache)"),
    Setting("node_background_bandwidth", "0", "cap on the background download, bytes per second (0: none)"),
    Setting("node_background_concurrency", "2", "background download batches in flight at once"),
    Setting("node_background_quiet", "1.0",
            "seconds without a foreground fetch before the rest of an image (beyond its startup profile) downloads (0: at once)"),
    Setting("node_gc_interval", "0",
            "seconds between removals of every chunk on the node's disk that no mounted image pins (0: none; "
            "the disk cache evicts least recently used chunks when it needs room either way)"),
    # clients
    Setting("region", "127.0.0.1:50061", "the regional store, where writes go: push, images, rm, startup profiles"),
    Setting("chunk_size", "1MiB", "chunk size used by push"),
    Setting("max_unpacked_bytes", "32GiB", "push refuses an image whose layers unpack to more than this (0: no bound)"),
    Setting("max_unpack_ratio", "200",
            "push refuses a layer that expands more than this many times past its first GiB (a decompression bomb; 0: no bound)"),
    Setting("fetch_timeout", "10", "seconds one upstream chunk fetch may take before it is retried"),
    Setting("fetch_retries", "8", "attempts for a chunk before a FUSE read fails with EIO (8: about 25 s of retries, backing off from 0.1 s)"),
    Setting("streaming", "auto", "'auto': stream where this node can (FUSE), else pull in full; 'off': always pull in full"),
    Setting("profile", "first", "record a startup profile: 'first' run of an image without one, 'always', 'never'"),
    Setting("record_reads", "", "FUSE client: write every read (inode, offset, size, path) to this file at unmount"),
    # the node's FUSE client (one per node, every image a directory of its mount)
    Setting("fuse_socket", "", "Unix socket of the node's FUSE client (default: HOME/fuse.sock)"),
    Setting("fuse_mountpoint", "", "the node's one FUSE mount, a directory per attached image (default: HOME/images)"),
    Setting("zipkin_port", "9411", "port of the local stack's Zipkin (tracing UI and API)"),
    # containerd snapshotter (node agent)
    Setting("snapshotter_socket", "", "Unix socket of the containerd snapshotter (default: HOME/snapshotter.sock)"),
    Setting("snapshotter_root", "", "snapshots, image mounts and metadata of the snapshotter (default: HOME/snapshotter)"),
    Setting("snapshotter_metrics", "127.0.0.1:9464", "address of the snapshotter's Prometheus /metrics ('' for none)"),
    Setting("containerd_socket", "/run/containerd/containerd.sock",
            "containerd's gRPC socket: the snapshotter reads a container's pod from it for the ImageStreaming event"),
    Setting("log_level", "INFO", "logging level of the services"),
    # authentication (imagestream/tls.py)
    Setting("tls", "on", "mutual TLS on every TCP hop between tiers (gRPC and the OCI endpoint): 'on', or 'off' on a network that is trusted already"),
    Setting("tls_dir", "", "folder of the CA and the certificates `imagestream stack up` makes (default: HOME/tls)"),
    Setting("tls_ca", "", "CA certificate(s) a peer's certificate must be signed by (default: TLS_DIR/ca.crt)"),
    Setting("tls_cert", "", "this process's certificate, which carries its role (default: TLS_DIR/<process>.crt; the CLI's is pusher.crt)"),
    Setting("tls_key", "", "the private key of IMAGESTREAM_TLS_CERT (default: TLS_DIR/<process>.key)"),
    Setting("tenants", "", "regional read policy, a file of lines 'TENANT PREFIX...': a caller whose certificate names a tenant reads only images under its prefixes (default: every authenticated reader reads every image)"),
    Setting("socket_group", "", "group given access to the node's Unix sockets (mode 0660; default: none, mode 0600)"),
]}


def get(name: str) -> str:
    return SETTINGS[name].value()


def home() -> pathlib.Path:
    return pathlib.Path(get("home")).absolute()


def node_cache_socket() -> str:
    return get("node_cache_socket") or str(home() / "node-cache.sock")


def fuse_socket() -> str:
    return get("fuse_socket") or str(home() / "fuse.sock")


def fuse_mountpoint() -> pathlib.Path:
    return pathlib.Path(get("fuse_mountpoint") or home() / "images").absolute()


def snapshotter_socket() -> str:
    return get("snapshotter_socket") or str(home() / "snapshotter.sock")


def snapshotter_root() -> pathlib.Path:
    return pathlib.Path(get("snapshotter_root") or home() / "snapshotter").absolute()


def node_memory_split(node_memory_bytes: str, fuse_cache_bytes: str) -> tuple[int, int]:
    """(the node cache's memory tier, the FUSE client's chunk cache): one reservation, shared by the node's
    two processes, so that what a node holds in chunks is the reservation whatever the number of images."""
    from imagestream.errors import InvalidArgument

    try:
        reservation = parse_size(node_memory_bytes)
        fuse = parse_size(fuse_cache_bytes) if str(fuse_cache_bytes).strip() else reservation // 8
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if fuse >= reservation:
        raise InvalidArgument(f"{SETTINGS['fuse_cache_bytes'].env}={fuse_cache_bytes!r} leaves nothing of "
                         f"{SETTINGS['node_memory_bytes'].env}={node_memory_bytes!r} for the node cache's memory tier")
    return reservation - fuse, fuse


def node_disk_dir() -> pathlib.Path:
    return pathlib.Path(get("node_disk_dir") or home() / "node-cache")


def secret_file(setting: str) -> pathlib.Path:
    """Where the password of a `*_password_file` setting is: the setting, else HOME/secrets/<default name>."""
    default = {"redis_password_file": "redis-zonal-cache", "cassandra_password_file": "cassandra-chunk-store",
               "cassandra_admin_password_file": "cassandra-admin"}[setting]
    return pathlib.Path(get(setting) or home() / "secrets" / default)


def read_secret(setting: str, value: str | None = None) -> str | None:
    """The password a `*_password_file` setting names (`value`: the setting as a service's flag gave it).

    None when no file was named and the default one does not exist (the backend then refuses the
    unauthenticated client, which says so). A file that is named and cannot be read, or is empty,
    is one clear error: a password is never taken from a command line or a variable."""
    from imagestream.errors import InvalidArgument

    named = get(setting) if value is None else value
    path = pathlib.Path(named) if named else secret_file(setting)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if not named:
            return None
        raise InvalidArgument(f"{SETTINGS[setting].env}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{SETTINGS[setting].env}: cannot read {path}: {e}") from None
    if not text or "\n" in text:
        raise InvalidArgument(f"{SETTINGS[setting].env}: {path} must hold one line, the password")
    return text


def add_arguments(parser: argparse.ArgumentParser, *names: str) -> None:
    """Flags for the named settings, defaulting to their environment variables."""
    for name in names:
        s = SETTINGS[name]
        parser.add_argument(s.flag, dest=name, default=s.value(), help=f"{s.help} [{s.env}, default {s.default!r}]")


def markdown_table() -> str:
    """The settings as the README's table (`python -m imagestream.config`)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.env}` | `{s.flag}` | `{s.default}` | {s.help} |" for s in SETTINGS.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
