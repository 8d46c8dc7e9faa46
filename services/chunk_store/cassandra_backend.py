"""Chunks and image names in Apache Cassandra.

One keyspace (NetworkTopologyStrategy, replication configurable), tables:
`chunks` keyed by the full digest (hash and size form the partition key, so a
chunk is one partition read), `images` keyed by name, and `quarantine`, the
chunks found not to match their digest (see healing.py). Every statement is
prepared once; consistency levels are configurable per direction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from cassandra import ConsistencyLevel, DriverException
from cassandra.cluster import NoHostAvailable, Session

from opentelemetry.trace import SpanKind

from imagestream import telemetry
from imagestream.digests import Digest
from imagestream.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from imagestream.names import WritableImageNames, validate_name
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2

log = logging.getLogger(__name__)

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")


def consistency(name: str) -> int:
    try:
        return ConsistencyLevel.name_to_value[name.upper()]
    except KeyError:
        raise InvalidArgument(f"unknown Cassandra consistency level {name!r}") from None


class Statement:
    """A statement prepared on the connection's current session, and prepared again on a new one (`reconnect`)."""

    def __init__(self, cql: str, write: bool, prepared: Any, consistency: int | None = None,
                 fetch_size: int | None = None) -> None:
        self.cql, self.write, self.prepared = cql, write, prepared
        self.consistency, self.fetch_size = consistency, fetch_size  # set again on each new preparation

    @property
    def query_string(self) -> str:
        return self.prepared.query_string


class CassandraConnection:
    """A driver session, logged in as the service's role, on a keyspace the schema step made; an asyncio bridge.

    The driver resolves its contact points once, and afterwards knows nodes by address only: a node that
    comes back at another address (a Cassandra pod made again) is never found. So when no known node
    answers, the connection is made again from the contact points, resolved anew (`reconnect`)."""

    RECONNECT_EVERY_S = 5.0  # at most one new connection in this interval while Cassandra stays unreachable

    def __init__(
        self,
        hosts: list[str],
        port: int,
        keyspace: str,
        local_dc: str,
        read_consistency: str = "LOCAL_QUORUM",
        write_consistency: str = "LOCAL_QUORUM",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        from chunk_store import schema

        if not _IDENT.match(keyspace):
            raise InvalidArgument(f"keyspace {keyspace!r}: want a lower-case identifier")
        self.keyspace = keyspace
        self.read_cl = consistency(read_consistency)
        self.write_cl = consistency(write_consistency)
        self._connect = lambda: schema.connect(hosts, port, username, password, local_dc=local_dc)
        self.cluster = self._connect()
        self.session: Session = self.cluster.session
        try:
            schema.check(self.cluster, keyspace)
        except FailedPrecondition:
            self.cluster.shutdown()
            raise
        self._statements: list[Statement] = []
        self._reconnecting: asyncio.Lock | None = None  # made on the event loop that first needs it
        self._last_reconnect = 0.0

    def _prepare_on(self, session: Session, cql: str, write: bool, consistency: int | None = None,
                    fetch_size: int | None = None) -> Any:
        statement = session.prepare(cql.format(ks=self.keyspace))
        statement.consistency_level = consistency if consistency is not None else (
            self.write_cl if write else self.read_cl)
        if fetch_size is not None:
            statement.fetch_size = fetch_size
        # Every statement but a lightweight transaction gives the same result when run twice (chunks are
        # content-addressed): the driver may then retry it on another node when its coordinator dies.
        statement.is_idempotent = " IF " not in cql.upper()
        return statement

    def prepare(self, cql: str, write: bool, consistency: int | None = None, fetch_size: int | None = None) -> Statement:
        """`consistency`: this statement's own level instead of the configured one for its direction."""
        statement = Statement(cql, write, self._prepare_on(self.session, cql, write, consistency, fetch_size),
                              consistency, fetch_size)
        self._statements.append(statement)
        return statement

    async def reconnect(self) -> bool:
        """A new driver session from the contact points, resolved again, with every statement prepared on it;
        the old one closed. False if it was made less than RECONNECT_EVERY_S ago (or is being made): the
        caller's query is then not tried again."""
        if self._reconnecting is None:
            self._reconnecting = asyncio.Lock()
        if self._reconnecting.locked():
            async with self._reconnecting:  # another query is making it: use that one
                return True
        async with self._reconnecting:
            if time.monotonic() - self._last_reconnect < self.RECONNECT_EVERY_S:
                return False
            self._last_reconnect = time.monotonic()
            log.warning("cassandra: no known node answers; connecting again from the contact points")

            def fresh() -> tuple[Any, list[Any]]:
                cluster = self._connect()
                try:
                    return cluster, [self._prepare_on(cluster.session, s.cql, s.write, s.consistency, s.fetch_size)
                                     for s in self._statements]
                except BaseException:
                    cluster.shutdown()
                    raise

            cluster, prepared = await asyncio.to_thread(fresh)
            old, self.cluster, self.session = self.cluster, cluster, cluster.session
            for statement, p in zip(self._statements, prepared):
                statement.prepared = p
            log.info("cassandra: connected again (%s)", ", ".join(str(h.endpoint) for h in cluster.metadata.all_hosts()))
            await asyncio.to_thread(old.shutdown)
            return True

    async def execute(self, statement: Statement, params: tuple = (), host: Any = None) -> list[Any]:
        """Run a prepared statement without blocking the event loop; one span for the whole query.

        `host` makes that node the coordinator (one replica's own answer at consistency ONE)."""
        with telemetry.tracer.start_as_current_span("cassandra query", kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attributes({"db.system": "cassandra", "db.name": self.keyspace,
                                     "db.statement": statement.query_string})
            session = self.session
            try:
                return await self._execute(statement, params, host)
            except NoHostAvailable:
                pass
            if self.session is not session:
                again = True  # it ran on a session replaced meanwhile (another query reconnected): try the new one
            else:
                try:
                    again = await self.reconnect()
                except Unavailable as e:
                    raise Unavailable(f"cassandra: no node answers, and connecting again failed: {e}") from None
            if not again:
                # connected again a moment ago, and still no node answers (a Cassandra pod made again accepts
                # its clients a little after it resolves): wait out the interval once, then connect again
                await asyncio.sleep(max(0.0, self._last_reconnect + self.RECONNECT_EVERY_S - time.monotonic()))
                try:
                    again = await self.reconnect()
                except Unavailable as e:
                    raise Unavailable(f"cassandra: no node answers, and connecting again failed: {e}") from None
            if not again:
                raise Unavailable("cassandra: no node answers (NoHostAvailable); connecting again shortly")
            try:
                return await self._execute(statement, params, None)  # a node of the old session means nothing now
            except NoHostAvailable as e:
                raise Unavailable(f"cassandra: NoHostAvailable: {e}") from e

    def replicas(self, statement: Statement, params: tuple, live_only: bool = True) -> list[Any]:
        """The nodes (the live ones, with `live_only`) holding the partition a prepared statement with `params` reads."""
        key = statement.prepared.bind(params).routing_key
        return [h for h in self.cluster.metadata.get_replicas(self.keyspace, key) if not live_only or h.is_up is not False]

    async def _execute(self, statement: Statement, params: tuple, host: Any = None) -> list[Any]:
        """The query's rows; NoHostAvailable as it is (no node of the session answered), other failures as
        Unavailable."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()

        def ok(rows: Any) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(list(rows or [])))

        def failed(exc: BaseException) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(exc))

        try:
            self.session.execute_async(statement.prepared, params, host=host).add_callbacks(ok, failed)
            return await done
        except NoHostAvailable:
            raise
        except (DriverException, OSError) as e:
            raise Unavailable(f"cassandra: {type(e).__name__}: {e}") from e
        except Exception as e:  # server-side errors (Unavailable, timeouts) all mean "try later"
            if type(e).__module__.startswith("cassandra"):
                raise Unavailable(f"cassandra: {type(e).__name__}: {e}") from e
            raise

    def close(self) -> None:
        self.cluster.shutdown()


class CassandraChunkStore(ChunkStore):
    name = "cassandra"
    knows_duplicates = False  # content-addressed writes are idempotent: no read before write

    def __init__(self, db: CassandraConnection, find_concurrency: int = 64) -> None:
        super().__init__()
        self.db = db
        self._get = db.prepare("SELECT data FROM {ks}.chunks WHERE hash = ? AND size = ?", write=False)
        # stored_bytes is written with the data: a row gc deleted and a late touch brought back holds neither
        self._has = db.prepare("SELECT stored_bytes FROM {ks}.chunks WHERE hash = ? AND size = ?", write=False)
        self._put = db.prepare("INSERT INTO {ks}.chunks (hash, size, data, used_at, stored_bytes)"
                               " VALUES (?, ?, ?, ?, ?)", write=True)
        self._touch = db.prepare("UPDATE {ks}.chunks SET used_at = ? WHERE hash = ? AND size = ?", write=True)
        self._delete = db.prepare("DELETE FROM {ks}.chunks WHERE hash = ? AND size = ?", write=True)
        self._limit = asyncio.Semaphore(find_concurrency)

    async def get(self, digest: Digest) -> bytes:
        rows = await self.db.execute(self._get, (digest.hash, digest.size))
        if not rows:
            self.stats.misses += 1
            raise NotFound(f"chunk {digest.short} is not in the regional store")
        self.stats.hits += 1
        self.stats.bytes_served += len(rows[0].data)
        return rows[0].data

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        # Content-addressed: rewriting a chunk writes the same bytes, so no read-before-write.
        await self.db.execute(self._put, (digest.hash, digest.size, compressed, now_ms(), len(compressed)))
        return True

    async def contains(self, digest: Digest) -> bool:
        async with self._limit:
            rows = await self.db.execute(self._has, (digest.hash, digest.size))
            return bool(rows) and rows[0].stored_bytes is not None

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The chunks not stored; those stored are marked used now, so that gc's grace period keeps them for
        the push that asked (it will not upload them, and publishes its name later)."""
        digests = list(dict.fromkeys(digests))
        present = await asyncio.gather(*(self.contains(d) for d in digests))
        now = now_ms()

        async def touch(d: Digest) -> None:
            async with self._limit:
                await self.db.execute(self._touch, (now, d.hash, d.size))

        await asyncio.gather(*(touch(d) for d, here in zip(digests, present) if here))
        return [d for d, here in zip(digests, present) if not here]

    async def delete(self, digest: Digest) -> None:
        await self.db.execute(self._delete, (digest.hash, digest.size))

    # -- garbage collection (chunk_store/gc.py) ------------------------------------------------

    async def usage(self, digest: Digest) -> tuple[int | None, int | None] | None:
        """(used_at ms, stored bytes) of a chunk's row, None if there is no row."""
        if not hasattr(self, "_usage"):
            self._usage = self.db.prepare("SELECT used_at, stored_bytes FROM {ks}.chunks WHERE hash = ? AND size = ?",
                                          write=False)
            # a lightweight transaction: a push that marks the chunk used in between wins, the chunk stays
            self._delete_if = self.db.prepare("DELETE FROM {ks}.chunks WHERE hash = ? AND size = ? IF used_at = ?",
                                              write=True)
        rows = await self.db.execute(self._usage, (digest.hash, digest.size))
        return (rows[0].used_at, rows[0].stored_bytes) if rows else None

    async def delete_if_unused_since(self, digest: Digest, used_at: int | None) -> bool:
        """Delete the chunk unless it was marked used after `used_at` (what `usage` read); True if deleted."""
        rows = await self.db.execute(self._delete_if, (digest.hash, digest.size, used_at))
        return bool(rows and rows[0][0])

    # -- self-healing (chunk_store/healing.py) -----------------------------------------------

    def _prepare_healing(self) -> None:
        if hasattr(self, "_get_all"):
            return
        db = self.db
        self._get_all = db.prepare("SELECT data FROM {ks}.chunks WHERE hash = ? AND size = ?", write=False,
                                   consistency=ConsistencyLevel.ALL)
        self._get_one = db.prepare("SELECT data FROM {ks}.chunks WHERE hash = ? AND size = ?", write=False,
                                   consistency=ConsistencyLevel.ONE)
        self._put_all = db.prepare("INSERT INTO {ks}.chunks (hash, size, data, used_at, stored_bytes)"
                                   " VALUES (?, ?, ?, ?, ?)", write=True, consistency=ConsistencyLevel.ALL)
        self._quarantine = db.prepare("INSERT INTO {ks}.quarantine (hash, size, found_at, reason, bad_sha256, healed)"
                                      " VALUES (?, ?, ?, ?, ?, ?)", write=True)
        self._quarantined = db.prepare("SELECT hash, size, found_at, reason, bad_sha256, healed FROM {ks}.quarantine",
                                       write=False)
        # ONE: each chunk is then read replica by replica anyway. Small pages: the node may read each
        # partition's row (up to a chunk's MiB) to list its key, and a page of hundreds of them at once
        # exhausts a small heap (the node exits on OutOfMemoryError)
        self._all_keys = db.prepare("SELECT DISTINCT hash, size FROM {ks}.chunks", write=False,
                                    consistency=ConsistencyLevel.ONE, fetch_size=16)

    async def copies(self, digest: Digest, strong: bool = True) -> list[tuple[str, bytes | None]]:
        """Each replica's own copy ((replica, bytes), None where it has none), read at consistency ONE with that
        replica coordinating, so that no read repair mixes them; then, with `strong`, the copy read at ALL.
        Replicas that do not answer are left out."""
        self._prepare_healing()
        params = (digest.hash, digest.size)
        attempts = [(self._get_one, host) for host in self.db.replicas(self._get_one, params)]
        if strong:
            attempts.append((self._get_all, None))
        found: list[tuple[str, bytes | None]] = []
        for statement, host in attempts:
            try:
                rows = await self.db.execute(statement, params, host=host)
            except Unavailable as e:
                log.info("chunk %s: the copy of %s could not be read: %s", digest.short, host or "ALL", e)
                continue
            found.append((str(host.address) if host else "ALL", rows[0].data if rows else None))
        return found

    def replica_count(self, digest: Digest) -> int:
        """How many nodes the keyspace keeps a copy of this chunk on, up or not."""
        self._prepare_healing()
        return len(self.db.replicas(self._get_one, (digest.hash, digest.size), live_only=False))

    async def rewrite(self, digest: Digest, compressed: bytes) -> None:
        """Write a good copy again: a new write timestamp supersedes a bad copy on every replica that takes it.
        At ALL, because the replica with the bad copy is the one that must take it: a quorum's answer may come
        from the others while a busy node drops the write, and the next scrub would find the bad copy again.
        With a replica down, at the usual consistency (the down one gets it by hint or repair)."""
        self._prepare_healing()
        params = (digest.hash, digest.size, compressed, now_ms(), len(compressed))
        try:
            await self.db.execute(self._put_all, params)
        except Unavailable as e:
            log.warning("chunk %s: the good copy did not reach every replica (%s); written at quorum", digest.short, e)
            await self.db.execute(self._put, params)

    async def quarantine(self, digest: Digest, reason: str, bad_sha256: str, healed: bool) -> None:
        self._prepare_healing()
        await self.db.execute(self._quarantine, (digest.hash, digest.size, int(time.time()), reason[:500],
                                                 bad_sha256, healed))

    async def quarantine_list(self) -> list[Any]:
        self._prepare_healing()
        return await self.db.execute(self._quarantined)

    def all_digests(self):  # type: ignore[no-untyped-def]
        """Every stored chunk's digest, paged (a blocking iterator: run it in a thread)."""
        self._prepare_healing()
        paging_state = None
        while True:
            for attempt in range(6):  # a page that times out (a busy or restarting node) is asked for again
                try:
                    result = self.db.session.execute(self._all_keys.prepared, paging_state=paging_state, timeout=60)
                    break
                except Exception as e:  # noqa: BLE001 - the driver's timeouts and unavailability
                    if attempt == 5:
                        raise
                    log.warning("listing chunks: page failed, again in %d s: %s", 2**attempt, e)
                    time.sleep(2**attempt)
            for row in result.current_rows:
                yield row.hash, row.size
            paging_state = result.paging_state
            if paging_state is None:
                return


class CassandraImageNames(WritableImageNames):
    def __init__(self, db: CassandraConnection) -> None:
        self.db = db
        self._get = db.prepare("SELECT * FROM {ks}.images WHERE name = ?", write=False)
        self._all = db.prepare("SELECT * FROM {ks}.images", write=False)
        self._put = db.prepare(
            "INSERT INTO {ks}.images (name, index_hash, index_size, source_digest, content_bytes, chunk_count,"
            " published_at, streaming_disabled, manifest_digest, profile_hash, profile_size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, null, null)",
            write=True,
        )
        self._delete = db.prepare("DELETE FROM {ks}.images WHERE name = ? IF EXISTS", write=True)
        # conditional: the profile belongs to the index it was recorded on, not to whatever the name points at now
        self._profile = db.prepare(
            "UPDATE {ks}.images SET profile_hash = ?, profile_size = ? WHERE name = ? IF index_hash = ? AND index_size = ?",
            write=True,
        )

    @staticmethod
    def _image(row: Any) -> images_pb2.Image:
        image = images_pb2.Image(
            name=row.name, source_digest=row.source_digest or "", content_bytes=row.content_bytes or 0,
            chunk_count=row.chunk_count or 0, published_at=row.published_at or 0,
            streaming_disabled=bool(row.streaming_disabled), manifest_digest=row.manifest_digest or "",
        )
        image.index.hash, image.index.size_bytes = row.index_hash, row.index_size
        if row.profile_hash:
            image.profile.hash, image.profile.size_bytes = row.profile_hash, row.profile_size
        return image

    async def resolve(self, name: str) -> images_pb2.Image:
        rows = await self.db.execute(self._get, (validate_name(name),))
        if not rows:
            raise NotFound(f"image {name!r} is not published")
        return self._image(rows[0])

    async def publish(self, image: images_pb2.Image) -> images_pb2.Image:
        stored = images_pb2.Image()
        stored.CopyFrom(image)
        stored.published_at = int(time.time())
        await self.db.execute(
            self._put,
            (validate_name(image.name), image.index.hash, image.index.size_bytes, image.source_digest,
             image.content_bytes, image.chunk_count, stored.published_at, image.streaming_disabled,
             image.manifest_digest or None),
        )
        return stored

    async def list(self) -> list[images_pb2.Image]:
        return sorted((self._image(r) for r in await self.db.execute(self._all)), key=lambda i: i.name)

    async def delete(self, name: str) -> bool:
        rows = await self.db.execute(self._delete, (validate_name(name),))
        return bool(rows and rows[0][0])

    async def set_profile(self, name: str, index: Digest, profile: Digest) -> images_pb2.Image:
        rows = await self.db.execute(self._profile, (profile.hash, profile.size, validate_name(name), index.hash, index.size))
        if not (rows and rows[0][0]):
            raise FailedPrecondition(f"image {name!r} is not published at index {index}")
        return await self.resolve(name)


def now_ms() -> int:
    return int(time.time() * 1000)


def connect_from_settings(values: dict[str, str]) -> CassandraConnection:
    from imagestream import config

    return CassandraConnection(
        hosts=[h.strip() for h in values["cassandra_hosts"].split(",") if h.strip()],
        port=int(values["cassandra_port"]),
        keyspace=values["cassandra_keyspace"],
        local_dc=values["cassandra_local_dc"],
        username=values["cassandra_username"],
        password=config.read_secret("cassandra_password_file", values["cassandra_password_file"]),
        read_consistency=values["read_consistency"],
        write_consistency=values["write_consistency"],
    )


