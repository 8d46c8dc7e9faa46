"""Storing a converted image's chunks and index in the region: only those it lacks."""

from __future__ import annotations

from imagestream.ingest.convert import Converted
from imagestream.store.base import ChunkStore


async def upload_chunks(store: ChunkStore, converted: Converted, spool, on_total=lambda n: None,  # type: ignore[no-untyped-def]
                        on_bytes=lambda n: None) -> tuple[int, int]:
    """Store the chunks and the index of a conversion that `store` lacks (push, and the regional tier's
    mirror conversions): returns how many were uploaded and their compressed bytes."""
    wanted = [*converted.chunks, converted.index_digest]
    missing = []
    for i in range(0, len(wanted), 5000):
        missing += await store.find_missing(wanted[i : i + 5000])
    total = sum(spool.sizes.get(d) or spool.path(d).stat().st_size for d in missing)
    on_total(total)

    def chunks():  # type: ignore[no-untyped-def]
        for digest in missing:
            data = spool.read(digest)
            on_bytes(len(data))
            yield digest, data

    await store.put_many(chunks())
    return len(missing), total
