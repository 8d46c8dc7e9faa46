"""Blob records and tags of the OCI Distribution side, in the regional store's Cassandra keyspace.

Two tables beside `chunks` and `images`: `blobs` (digest -> size, media type, the
chunks it is made of) and `tags` ((repository, tag) -> manifest digest). The
bytes themselves are chunks of the `chunks` table, written by push like any other.
"""

from __future__ import annotations

from chunk_store.distribution.blobs import BlobIndex
from imagestream.oci import BlobRecord

from chunk_store.cassandra_backend import CassandraConnection, now_ms


class CassandraBlobIndex(BlobIndex):
    def __init__(self, db: CassandraConnection) -> None:
        self.db = db
        # the tables are made by the schema step (chunk_store/schema.py)
        self._put_blob = db.prepare("INSERT INTO {ks}.blobs (digest, size, media_type, pieces, used_at)"
                                    " VALUES (?, ?, ?, ?, ?)", write=True)
        self._touch = db.prepare("UPDATE {ks}.blobs SET used_at = ? WHERE digest = ?", write=True)
        self._all_blobs = db.prepare("SELECT digest, used_at FROM {ks}.blobs", write=False)
        self._all_tags = db.prepare("SELECT repository, tag, digest FROM {ks}.tags", write=False)
        self._delete_if = db.prepare("DELETE FROM {ks}.blobs WHERE digest = ? IF used_at = ?", write=True)
        self._get_blob = db.prepare("SELECT size, media_type, pieces FROM {ks}.blobs WHERE digest = ?", write=False)
        self._put_tag = db.prepare("INSERT INTO {ks}.tags (repository, tag, digest) VALUES (?, ?, ?)", write=True)
        self._get_tag = db.prepare("SELECT digest FROM {ks}.tags WHERE repository = ? AND tag = ?", write=False)
        self._delete_tag = db.prepare("DELETE FROM {ks}.tags WHERE repository = ? AND tag = ?", write=True)

    async def put_blob(self, record: BlobRecord) -> None:
        await self.db.execute(self._put_blob, (record.digest, record.size, record.media_type, record.pieces_bytes(),
                                               now_ms()))

    async def get_blob(self, digest: str) -> BlobRecord | None:
        rows = await self.db.execute(self._get_blob, (digest,))
        if not rows or rows[0].size is None:  # none, or only a late touch of a record gc removed
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

    async def touch(self, digest: str) -> None:
        await self.db.execute(self._touch, (now_ms(), digest))

    async def all_blobs(self) -> list[tuple[str, int | None]]:
        return [(r.digest, r.used_at) for r in await self.db.execute(self._all_blobs)]

    async def all_tags(self) -> list[tuple[str, str, str]]:
        return [(r.repository, r.tag, r.digest) for r in await self.db.execute(self._all_tags)]

    async def delete_blob_if(self, digest: str, used_at: int | None) -> bool:
        rows = await self.db.execute(self._delete_if, (digest, used_at))
        return bool(rows and rows[0][0])
