"""Pull-through conversion: the regional OCI endpoint fronts upstream registries.

`imagestream mirror add UPSTREAM --repository PREFIX` records a mirror (table `mirrors`). A pull of
PREFIX/REPO:TAG that the endpoint does not hold yet is then answered from the upstream: its manifest as
it is, its blobs streamed through (never copied into the store), so that pull takes what a normal pull
takes (a *fallback*, said in the log, in the `X-Imagestream-Mirror` response header and in
`imagestream_mirror_fallback_pulls_total`). Meanwhile the image is converted once, as `push REF` converts
it (the same registry client, credentials, CA and plain-HTTP handling, the same converter), and published
as the name PREFIX/REPO:TAG with an annotated manifest (and the image's config): from then on it is
served streamable like a pushed image, its layer blobs still proxied from the upstream.

Once only: a conversion is claimed with a Cassandra lightweight transaction on its row of `conversions`
(INSERT IF NOT EXISTS, or taking over a failed, finished or abandoned one IF the owner and heartbeat are
still what was read), so concurrent requests, in one process or on several regional replicas, start one
conversion. The owner writes its progress (and heartbeat) every second; a row whose heartbeat is older
than STALE_S is abandoned (its owner died) and the next pull takes it over. A failed conversion
publishes nothing (the name is the last step, as for push) and keeps its reason until a pull RETRY_S
later tries again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

from imagestream import config
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound
from imagestream.index import ensure_complete
from imagestream.names import WritableImageNames, validate_name
from imagestream.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, REFERENCE
from imagestream.rpc.server import status_on_error
from imagestream.snapshot_labels import annotate_for_streaming
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2, mirror_pb2, mirror_pb2_grpc
from imagestream.ingest.registry import HOST_PATTERN, REPOSITORY_PATTERN, Manifest, Reference, RegistryClient, RegistryError

from chunk_store.cassandra_backend import CassandraConnection
from chunk_store.distribution.blobs import Distribution

log = logging.getLogger(__name__)

HEADER = "X-Imagestream-Mirror"
STALE_S = 30.0  # a converting row whose heartbeat is this old was abandoned (its owner died)
RETRY_S = 60.0  # a failed conversion is tried again by a pull this much later
MIRRORS_REFRESH_S = 5.0  # how often a replica reads the mirror table again (another replica may have changed it)
MAX_ERROR = 400


@dataclasses.dataclass(frozen=True)
class MirrorRecord:
    prefix: str
    upstream: str
    plain_http: bool = False
    ca_pem: str = ""
    username: str = ""
    password: str = ""
    added_at: int = 0

    def access(self) -> dict:
        """The RegistryClient's login and CA (registry.py: the same client as `push REF`)."""
        return {"login": (self.username, self.password) if self.username else None, "ca_pem": self.ca_pem}

    def client(self, repository: str) -> RegistryClient:
        return RegistryClient(Reference(self.upstream, repository), plain_http=self.plain_http, **self.access())

    def to_proto(self) -> mirror_pb2.Mirror:
        return mirror_pb2.Mirror(prefix=self.prefix, upstream=self.upstream, plain_http=self.plain_http,
                                 custom_ca=bool(self.ca_pem), username=self.username, added_at=self.added_at)


def default_prefix(upstream: str) -> str:
    """The upstream's host as a repository path component: 'registry.example.com:5000' -> 'registry.example.com-5000'."""
    return upstream.lower().replace(":", "-").strip("[]")


@dataclasses.dataclass
class MirrorStats:
    fallbacks: int = 0  # pulls answered with the upstream's manifest while not converted
    proxied_blobs: int = 0
    proxied_bytes: int = 0
    published: int = 0
    failed: int = 0
    percent: dict[str, int] = dataclasses.field(default_factory=dict)  # conversions running here


class MirrorTable:
    """`mirrors` and `conversions` in the regional keyspace (made by chunk_store/schema.py)."""

    def __init__(self, db: CassandraConnection) -> None:
        self.db = db
        cols = "prefix, upstream, plain_http, ca_pem, username, password, added_at"
        self._put = db.prepare(f"INSERT INTO {{ks}}.mirrors ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?)", write=True)
        self._all = db.prepare(f"SELECT {cols} FROM {{ks}}.mirrors", write=False)
        self._delete = db.prepare("DELETE FROM {ks}.mirrors WHERE prefix = ? IF EXISTS", write=True)
        ccols = "name, upstream, state, owner, heartbeat, percent, error, updated_at"
        self._get = db.prepare(f"SELECT {ccols} FROM {{ks}}.conversions WHERE name = ?", write=False)
        self._conversions = db.prepare(f"SELECT {ccols} FROM {{ks}}.conversions", write=False)
        self._claim = db.prepare("INSERT INTO {ks}.conversions (name, upstream, state, owner, heartbeat, percent, error,"
                                 " updated_at) VALUES (?, ?, 'converting', ?, ?, 0, '', ?) IF NOT EXISTS", write=True)
        self._take = db.prepare("UPDATE {ks}.conversions SET upstream = ?, state = 'converting', owner = ?,"
                                " heartbeat = ?, percent = 0, error = '', updated_at = ? WHERE name = ?"
                                " IF owner = ? AND heartbeat = ?", write=True)
        self._progress = db.prepare("UPDATE {ks}.conversions SET heartbeat = ?, percent = ?, updated_at = ?"
                                    " WHERE name = ? IF owner = ?", write=True)
        self._finish = db.prepare("UPDATE {ks}.conversions SET state = ?, percent = ?, error = ?, heartbeat = ?,"
                                  " updated_at = ? WHERE name = ? IF owner = ?", write=True)

    async def put(self, m: MirrorRecord) -> None:
        await self.db.execute(self._put, (m.prefix, m.upstream, m.plain_http, m.ca_pem, m.username, m.password,
                                          m.added_at))

    async def all(self) -> list[MirrorRecord]:
        return [MirrorRecord(r.prefix, r.upstream, bool(r.plain_http), r.ca_pem or "", r.username or "",
                             r.password or "", r.added_at or 0) for r in await self.db.execute(self._all)]

    async def delete(self, prefix: str) -> bool:
        rows = await self.db.execute(self._delete, (prefix,))
        return bool(rows and rows[0][0])

    async def conversion(self, name: str):  # type: ignore[no-untyped-def]
        rows = await self.db.execute(self._get, (name,))
        return rows[0] if rows else None

    async def conversions(self) -> list:
        return list(await self.db.execute(self._conversions))

    async def claim(self, name: str, upstream: str, owner: str, seen) -> bool:  # type: ignore[no-untyped-def]
        """Become the converter of `name`: the row is new, or still what `seen` was when it was read."""
        now = _now_ms()
        if seen is None:
            rows = await self.db.execute(self._claim, (name, upstream, owner, now, now))
        else:
            rows = await self.db.execute(self._take, (upstream, owner, now, now, name, seen.owner, seen.heartbeat))
        return bool(rows and rows[0][0])

    async def progress(self, name: str, owner: str, percent: int) -> bool:
        now = _now_ms()
        rows = await self.db.execute(self._progress, (now, percent, now, name, owner))
        return bool(rows and rows[0][0])

    async def finish(self, name: str, owner: str, state: str, percent: int, error: str) -> None:
        now = _now_ms()
        await self.db.execute(self._finish, (state, percent, error[:MAX_ERROR], now, now, name, owner))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Mirrors:
    """The regional tier's mirrors: which names they front, the upstream's answers, and the conversions."""

    def __init__(self, table: MirrorTable, store: ChunkStore, names: WritableImageNames,
                 distribution: Distribution) -> None:
        self.table = table
        self.store = store
        self.names = names
        self.distribution = distribution
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"
        self.stats = MirrorStats()
        self._mirrors: list[MirrorRecord] = []
        self._read_at = -MIRRORS_REFRESH_S
        self._running: dict[str, asyncio.Task[None]] = {}  # single flight in this process

    # -- configuration ---------------------------------------------------------------------------
    async def add(self, request: mirror_pb2.AddMirrorRequest) -> MirrorRecord:
        upstream = request.upstream.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
        if not HOST_PATTERN.match(upstream) or "/" in upstream:
            raise InvalidArgument(f"mirror upstream {request.upstream!r}: want HOST[:PORT] of a registry")
        prefix = request.prefix.strip("/") or default_prefix(upstream)
        if not REPOSITORY_PATTERN.match(prefix) or len(prefix) > 128:
            raise InvalidArgument(f"mirror prefix {prefix!r}: want a repository path (lower-case letters, digits, "
                                  f"separators, '/')")
        if len(request.ca_pem) > 64 << 10 or len(request.username) > 255 or len(request.password) > 4096:
            raise InvalidArgument("mirror: CA, user name or password too long")
        record = MirrorRecord(prefix, upstream, request.plain_http, request.ca_pem, request.username,
                              request.password, int(time.time()))
        try:  # a mirror that cannot log in would only fail pulls later: say so now
            await asyncio.to_thread(self._ping, record)
        except RegistryError as e:
            raise FailedPrecondition(f"mirror {prefix} -> {upstream}: {e}") from None
        await self.table.put(record)
        self._read_at = -MIRRORS_REFRESH_S
        log.info("mirror added: %s/ -> %s%s", prefix, upstream, " (plain HTTP)" if record.plain_http else "")
        return record

    @staticmethod
    def _ping(record: MirrorRecord) -> None:
        with record.client("imagestream-mirror-check") as client:
            client.ping()

    async def remove(self, prefix: str) -> bool:
        removed = await self.table.delete(prefix.strip("/"))
        self._read_at = -MIRRORS_REFRESH_S
        return removed

    async def list(self, fresh: bool = False) -> list[MirrorRecord]:
        """The mirrors, longest prefix first; read again from the table every MIRRORS_REFRESH_S (or now)."""
        if fresh or time.monotonic() - self._read_at >= MIRRORS_REFRESH_S:
            self._mirrors = sorted(await self.table.all(), key=lambda m: -len(m.prefix))  # the longest prefix wins
            self._read_at = time.monotonic()
        return self._mirrors

    async def match(self, repository: str) -> tuple[MirrorRecord, str] | None:
        """(mirror, the upstream's repository) if `repository` is under a mirror's prefix."""
        for m in await self.list():
            if repository.startswith(m.prefix + "/") and len(repository) > len(m.prefix) + 1:
                return m, repository[len(m.prefix) + 1:]
        return None

    # -- the fallback: the upstream's answers, streamed through ------------------------------------
    async def upstream_manifest(self, mirror: MirrorRecord, repository: str, reference: str) -> Manifest:
        def fetch() -> Manifest:
            with mirror.client(repository) as client:
                return client.manifest(reference)

        return await asyncio.to_thread(fetch)

    async def upstream_blob(self, mirror: MirrorRecord, repository: str, digest: str,
                            head: bool = False) -> tuple[int, AsyncIterator[bytes]]:
        """(size, its bytes) of an upstream blob, streamed off the upstream's connection and checked
        against `digest`: a mismatch or a cut upstream raises before the last piece."""
        client = mirror.client(repository)
        try:
            body = await asyncio.to_thread(client.open_blob, digest, None)
        except BaseException:
            client.close()
            raise
        if head:
            body.close()
            client.close()

        async def pieces() -> AsyncIterator[bytes]:
            h = hashlib.sha256()
            try:
                while data := await asyncio.to_thread(body.read, 1 << 20):
                    h.update(data)
                    self.stats.proxied_bytes += len(data)
                    yield data
                if "sha256:" + h.hexdigest() != digest:
                    raise RegistryError(f"{client.where}: blob {digest} does not match its digest")
                self.stats.proxied_blobs += 1
            finally:
                body.close()
                client.close()

        return body.size, pieces()

    # -- conversion, once -------------------------------------------------------------------------
    async def convert_on_pull(self, mirror: MirrorRecord, repository: str, tag: str, name: str) -> str:
        """Start converting `name` unless it is under way (here or on another replica) or failed lately;
        returns its state, for the response header."""
        if name in self._running:
            return "converting"
        row = await self.table.conversion(name)
        now = _now_ms()
        if row is not None:
            age_s = (now - (row.heartbeat or 0)) / 1000
            if row.state == "converting" and age_s < STALE_S:
                return "converting"
            if row.state == "failed" and age_s < RETRY_S:
                return "failed: " + (row.error or "")
            if row.state == "done" and await self._published(name):
                return "converted"  # published while this request asked the upstream: nothing to do again
        upstream = f"{mirror.upstream}/{repository}:{tag}"
        if not await self.table.claim(name, upstream, self.owner, row):
            return "converting"  # another request or replica claimed it between the read and now
        if name in self._running:  # claimed twice by this process's own requests racing: one task
            return "converting"
        log.info("mirror: converting %s from %s (first pull)", name, upstream)
        self.stats.percent[name] = 0
        self._running[name] = asyncio.create_task(self._convert(mirror, repository, tag, name, upstream))
        return "converting"

    async def _published(self, name: str) -> bool:
        try:
            await self.names.resolve(name)
            return True
        except NotFound:
            return False  # removed since (`rm`): a pull converts it again

    async def _convert(self, mirror: MirrorRecord, repository: str, tag: str, name: str, upstream: str) -> None:
        progress = {"percent": 0, "lost": False}
        beat = asyncio.create_task(self._heartbeat(name, progress))
        try:
            image = await self._convert_and_store(mirror, repository, tag, name, progress)
            beat.cancel()
            if progress["lost"]:
                raise FailedPrecondition("another replica took the conversion over")
            await self.names.publish(image)  # last: the name appears once everything is stored
            await self.table.finish(name, self.owner, "done", 100, "")
            self.stats.published += 1
            log.info("mirror: %s converted and published (index %s); served streamable from now on", name,
                     image.index.hash[:12])
        except Exception as e:  # noqa: BLE001 - a conversion's failure is recorded, never raised into the server
            reason = str(e) if isinstance(e, ImagestreamError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, ImagestreamError):
                log.exception("mirror: conversion of %s failed", name)
            log.error("mirror: conversion of %s from %s failed, nothing published: %s", name, upstream, reason)
            self.stats.failed += 1
            try:
                await self.table.finish(name, self.owner, "failed", progress["percent"], reason)
            except ImagestreamError as f:
                log.error("mirror: could not record the failure of %s: %s", name, f)
        finally:
            beat.cancel()
            self.stats.percent.pop(name, None)
            self._running.pop(name, None)

    async def _heartbeat(self, name: str, progress: dict) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.stats.percent[name] = progress["percent"]
            try:
                if not await self.table.progress(name, self.owner, progress["percent"]):
                    progress["lost"] = True
                    return
            except ImagestreamError as e:
                log.warning("mirror: progress of %s not recorded: %s", name, e)

    async def _convert_and_store(self, mirror: MirrorRecord, repository: str, tag: str, name: str,
                                 progress: dict) -> images_pb2.Image:
        """What `push REF` does, into this tier's own store: read and convert the upstream image (90%),
        store its chunks and index (to 99%), its config and its annotated manifest; the layer blobs are not
        copied (the endpoint proxies them). Returns the image to publish."""
        from imagestream.ingest.convert import convert
        from imagestream.ingest.upload import upload_chunks
        from imagestream.ingest.source import open_image
        from imagestream.ingest.spool import push_spool

        chunk_size = config.parse_size(config.get("chunk_size"))
        with push_spool() as spool_dir:
            source = await asyncio.to_thread(open_image, f"{mirror.upstream}/{repository}:{tag}", None,
                                             spool_dir / "blobs", None, mirror.plain_http, **mirror.access())
            try:
                done = [0]

                def on_bytes(n: int) -> None:  # from the converting thread
                    done[0] += n
                    progress["percent"] = min(90, 90 * done[0] // max(1, source.download_bytes))

                source.on_bytes = on_bytes
                converted, spool = await asyncio.to_thread(convert, source, spool_dir, chunk_size)
                total, sent = [1], [0]

                def uploaded(n: int) -> None:
                    sent[0] += n
                    progress["percent"] = 90 + 9 * sent[0] // max(1, total[0])

                await upload_chunks(self.store, converted, spool, on_total=lambda n: total.__setitem__(0, n),
                                    on_bytes=uploaded)
                manifest = annotate_for_streaming(source.manifest, name, converted.index_digest)
                config_bytes, config_type = source.config_bytes, manifest["config"].get("mediaType", MEDIA_OCI_CONFIG)
            finally:
                source.close()
        # the config is small and every pull reads it: stored, so a streamed pull never waits on the upstream
        if await self.distribution.put_small_blob(config_type, config_bytes) != manifest["config"]["digest"]:
            raise FailedPrecondition(f"{name}: the upstream's config does not match its digest")
        content = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        digest = await self.distribution.put_proxied_manifest(manifest.get("mediaType") or MEDIA_OCI_MANIFEST,
                                                              content)
        image = images_pb2.Image(name=name, index=converted.index_digest.to_proto(),
                                 source_digest=converted.source_digest, manifest_digest=digest)
        await ensure_complete(self.store, image)
        return image

    async def conversions(self) -> list[mirror_pb2.Conversion]:
        return [mirror_pb2.Conversion(name=r.name, upstream=r.upstream or "", state=_state(r),
                                      percent=r.percent or 0, error=r.error or "",
                                      updated_at=(r.updated_at or 0) // 1000)
                for r in sorted(await self.table.conversions(), key=lambda r: r.name)]


def _state(row) -> str:  # type: ignore[no-untyped-def]
    """A converting row whose owner stopped beating is not converting any more."""
    if row.state == "converting" and (_now_ms() - (row.heartbeat or 0)) / 1000 >= STALE_S:
        return "failed"
    return row.state or ""


def tag_name(prefix_repository: str, reference: str) -> str | None:
    """The image name a pull of REPOSITORY:TAG converts into, or None for a digest (nothing to convert)."""
    if not REFERENCE.match(reference):
        return None
    try:
        return validate_name(f"{prefix_repository}:{reference}")
    except InvalidArgument:
        return None


class MirrorsServicer(mirror_pb2_grpc.MirrorsServicer):
    def __init__(self, mirrors: Mirrors) -> None:
        self.mirrors = mirrors

    async def AddMirror(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return (await self.mirrors.add(request)).to_proto()

    async def ListMirrors(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return mirror_pb2.MirrorList(mirrors=[m.to_proto() for m in sorted(await self.mirrors.list(fresh=True),
                                                                                key=lambda m: m.prefix)])

    async def RemoveMirror(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            if not request.prefix:
                raise InvalidArgument("which mirror? give its prefix")
            return mirror_pb2.RemoveMirrorResponse(removed=await self.mirrors.remove(request.prefix))

    async def ListConversions(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return mirror_pb2.ConversionList(conversions=await self.mirrors.conversions())


def families(mirrors: Mirrors):  # type: ignore[no-untyped-def]
    """Prometheus families of the mirrors (chunk_store/__main__.py's collector)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    s = mirrors.stats
    for name, help_, value in (
            ("imagestream_mirror_fallback_pulls", "Pulls of a mirrored image answered with the upstream's manifest "
                                                  "(a normal pull) because it was not converted yet", s.fallbacks),
            ("imagestream_mirror_proxied_blobs", "Upstream blobs streamed through to a client", s.proxied_blobs),
            ("imagestream_mirror_proxied_bytes", "Bytes of upstream blobs streamed through to clients", s.proxied_bytes)):
        family = CounterMetricFamily(name, help_)
        family.add_metric([], value)
        yield family
    conversions = CounterMetricFamily("imagestream_mirror_conversions", "Mirror conversions that ended, by outcome",
                                      labels=["outcome"])
    conversions.add_metric(["published"], s.published)
    conversions.add_metric(["failed"], s.failed)
    yield conversions
    running = GaugeMetricFamily("imagestream_mirror_conversion_percent", "Progress of the conversions this replica runs",
                                labels=["image"])
    for image, percent in sorted(s.percent.items()):
        running.add_metric([image], percent)
    yield running
    yield GaugeMetricFamily("imagestream_mirror_conversions_running", "Conversions this replica runs now",
                            value=len(s.percent))

