"""Blob records and tags of the OCI Distribution side, in the regional store's Cassandra keyspace.

Two tables beside `chunks` and `images`: `blobs` (digest -> size, media type, the
chunks it is made of) and `tags` ((repository, tag) -> manifest digest). The
bytes themselves are chunks of the `chunks` table, written by push like any other.
"""

from __future__ import annotations

from chunk_store.distribution.blobs import BlobIndex
from imagestream.oci import BlobRecord

from chunk_store.cassandra_backend import CassandraConnection


class CassandraBlobIndex(BlobIndex):
    def __init__(self, db: CassandraConnection) -> None:
        self.db = db
        ks = db.keyspace
        db.session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.blobs ("
                           " digest text PRIMARY KEY, size bigint, media_type text, pieces blob)")
        db.session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.tags ("
                           " repository text, tag text, digest text, PRIMARY KEY ((repository), tag))")
        db.cluster.control_connection.wait_for_schema_agreement()
        self._put_blob = db.prepare("INSERT INTO {ks}.blobs (digest, size, media_type, pieces) VALUES (?, ?, ?, ?)",
                                    write=True)
        self._get_blob = db.prepare("SELECT size, media_type, pieces FROM {ks}.blobs WHERE digest = ?", write=False)
        self._put_tag = db.prepare("INSERT INTO {ks}.tags (repository, tag, digest) VALUES (?, ?, ?)", write=True)
        self._get_tag = db.prepare("SELECT digest FROM {ks}.tags WHERE repository = ? AND tag = ?", write=False)
        self._delete_tag = db.prepare("DELETE FROM {ks}.tags WHERE repository = ? AND tag = ?", write=True)

    async def put_blob(self, record: BlobRecord) -> None:
        await self.db.execute(self._put_blob, (record.digest, record.size, record.media_type, record.pieces_bytes()))

    async def get_blob(self, digest: str) -> BlobRecord | None:
        rows = await self.db.execute(self._get_blob, (digest,))
        if not rows:
            return None
        row = rows[0]
        return BlobRecord(digest, row.size, row.media_type, BlobRecord.parse_pieces(row.pieces))

    async def put_tag(self, repository: str, reference: str, digest: str) -> None:
        await self.db.execute(self._put_tag, (repository, reference, digest))

    async def get_tag(self, repository: str, reference: str) -> str | None:
        rows = await self.db.execute(self._get_tag, (repository, reference))
        return rows[0].digest if rows else None

    async def delete_tag(self, repository: str, reference: str) -> None:
        await self.db.execute(self._delete_tag, (repository, reference))
