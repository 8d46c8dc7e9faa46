"""`imagestream push`: convert a source image and publish it to the regional store.

Order matters for "nothing half-published": every blob is read and checked
and the whole index built before anything is uploaded; chunks, index, blobs
and manifest are all stored before the name is published, the last step, so a
push that fails or is killed leaves no name behind; the regional store itself
refuses to publish a name whose chunks are not all stored. The spool is removed
on every exit (see `spool.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import pathlib
import time
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from imagestream import config, telemetry
from imagestream.digests import Digest, HashingStream, compress
from imagestream.errors import BadImage
from imagestream.names import validate_name
from imagestream.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, PIECE_SIZE, BlobRecord, layer_media_type, repository_and_tag
from imagestream.rpc.client import GrpcChunkStore, GrpcDistribution, GrpcImageNames
from imagestream.snapshot_labels import annotate_for_streaming
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2
from imagestream.ingest.convert import Converted, convert
from imagestream.ingest.source import open_image
from imagestream.ingest.spool import push_spool
from imagestream.ingest.upload import upload_chunks


@dataclasses.dataclass
class PushResult:
    image: images_pb2.Image
    converted: Converted
    uploaded_chunks: int
    uploaded_bytes: int
    convert_s: float
    upload_s: float
    manifest_digest: str = ""  # of the OCI manifest kept for pulls the normal way (chunk_store.distribution)
    blobs_stored: int = 0  # config and layer blobs stored by this push
    blobs_known: int = 0  # already stored (by digest): each original blob is kept once

    def summary(self) -> str:
        c = self.converted
        total = self.convert_s + self.upload_s
        return (
            f"pushed {self.image.name}: {c.files} files, {c.content_bytes / 1e6:.1f} MB in {len(c.chunks)} chunks; "
            f"uploaded {self.uploaded_chunks} new chunks ({self.uploaded_bytes / 1e6:.1f} MB compressed); "
            f"index sha256:{c.index_digest.hash[:12]}; {c.content_bytes / 1e6 / total:.1f} MB/s "
            f"(convert {self.convert_s:.1f} s, upload {self.upload_s:.1f} s); {self.blobs_stored} blobs stored, "
            f"{self.blobs_known} already stored; manifest {self.manifest_digest}"
        )


@dataclasses.dataclass
class SourceOptions:
    """How to read the source: the platform to pick from an image index (default: this node's), and for a
    registry, a private CA and whether it speaks plain HTTP."""

    platform: str | None = None
    ca_file: str | None = None
    plain_http: bool = False


def push(source: str | pathlib.Path, name: str, region: str | None = None, chunk_size: int | None = None,
         progress: bool = True, streaming: bool = True, options: SourceOptions | None = None) -> PushResult:
    with telemetry.tracer.start_as_current_span("push") as span:
        if span.is_recording():
            span.set_attributes({"imagestream.image": name, "imagestream.source": str(source)})
        return _push(source, name, region, chunk_size, progress, streaming, options or SourceOptions())


def _push(source: str | pathlib.Path, name: str, region: str | None, chunk_size: int | None,
          progress: bool, streaming: bool, options: SourceOptions) -> PushResult:
    validate_name(name)
    region = region or config.get("region")
    chunk_size = chunk_size or config.parse_size(config.get("chunk_size"))
    with push_spool() as spool_dir, open_image(source, options.platform, spool_dir / "blobs", options.ca_file,
                                               options.plain_http) as image_source:
        started = time.monotonic()
        # a registry's blobs stream in while the layers are converted: one bar for the bytes, one for the layers
        with tqdm(total=image_source.download_bytes, unit="B", unit_scale=True, desc="download",
                  disable=not progress or not image_source.download_bytes) as download, \
                tqdm(total=len(image_source.layers), unit="layer", desc="convert", disable=not progress) as bar:
            image_source.on_bytes = download.update
            converted, spool = convert(image_source, spool_dir, chunk_size,
                                       on_layer=lambda done, total: bar.update(1))
        convert_s = time.monotonic() - started
        started = time.monotonic()
        image, uploaded, uploaded_bytes, manifest, blobs = asyncio.run(
            _upload(converted, spool, name, region, progress, streaming, image_source))
        return PushResult(image, converted, uploaded, uploaded_bytes, convert_s, time.monotonic() - started, manifest,
                          *blobs)


async def _upload(converted: Converted, spool, name: str, target: str, progress: bool, streaming: bool,  # type: ignore[no-untyped-def]
                  source):
    store = GrpcChunkStore(target, name="regional")
    names = GrpcImageNames(target)
    dist = GrpcDistribution(target)
    try:
        with tqdm(unit="B", unit_scale=True, desc="upload", disable=not progress) as bar:
            def total(n: int) -> None:
                bar.total = n
                bar.refresh()

            uploaded, uploaded_bytes = await upload_chunks(store, converted, spool, on_total=total, on_bytes=bar.update)
        # what was received, kept for pulls the normal way; a streamable image's layers say so
        with tqdm(unit="B", unit_scale=True, desc="blobs", disable=not progress) as bar:
            manifest, _, blobs_stored, blobs_known = await push_blobs(
                source, store, dist, name, converted.index_digest if streaming else None, on_bytes=bar.update)
        # last: a name is never visible before everything it leads to is stored
        image = images_pb2.Image(name=name, index=converted.index_digest.to_proto(),
                                 source_digest=converted.source_digest, streaming_disabled=not streaming,
                                 manifest_digest=manifest)
        published = await names.publish(image)
        return published, uploaded, uploaded_bytes, manifest, (blobs_stored, blobs_known)
    finally:
        await store.close()
        await names.close()
        await dist.close()


# -- the blobs as received, for pulls the normal way ------------------------------

def split_pieces(f: IO[bytes]) -> Iterator[tuple[bytes, Digest, bytes]]:
    """(raw piece, its digest, its zstd frame) for consecutive PIECE_SIZE pieces of `f`."""
    while piece := f.read(PIECE_SIZE):
        yield piece, Digest.of(piece), compress(piece)



async def push_blobs(source, chunks: ChunkStore, dist: GrpcDistribution, name: str,  # type: ignore[no-untyped-def]
                     index: Digest | None, on_bytes=lambda n: None) -> tuple[str, int, int, int]:
    """Store the source's config and layer blobs as received, then its manifest, untagged: publishing NAME
    tags it (chunk_store.distribution.blobs.TaggedNames), so a push that fails before leaves no tag.

    `index` set: the image streams, and the stored manifest's layers carry the annotations a node's
    snapshotter looks for (see the module's doc). An OCI source keeps its manifest (plus those
    annotations); a docker archive, which has none, gets an OCI manifest made for it. Blobs already
    recorded are not read again. Returns the stored manifest's digest, the bytes uploaded, and the blobs
    stored and found already stored.
    """
    uploaded = stored = 0

    async def store_blob(opener, media_type: str, expected: str | None) -> dict[str, Any]:
        nonlocal uploaded, stored
        stored += 1
        pieces = []
        with opener() as f:
            blob = HashingStream(f)
            parts = split_pieces(blob)
            while (item := await asyncio.to_thread(next, parts, None)) is not None:
                raw, digest, compressed = item
                pieces.append(digest)
                if await chunks.find_missing([digest]):
                    await chunks.put(digest, compressed)
                    uploaded += len(compressed)
                if not media_type:
                    media_type = layer_media_type(raw[:4])
                on_bytes(len(raw))
        actual = blob.oci_digest()
        if expected is not None and actual != expected:
            raise BadImage(f"blob {expected} does not match its digest (content is {actual})")
        await dist.put_blob(BlobRecord(actual, blob.size, media_type, pieces))
        return {"mediaType": media_type, "digest": actual, "size": blob.size}

    manifest = source.manifest
    known = 0
    if manifest is not None:  # OCI: the blobs are named by the manifest
        descriptors = [manifest["config"], *manifest.get("layers", [])]
        missing = set(await dist.find_missing([d["digest"] for d in descriptors]))
        known = len({d["digest"] for d in descriptors} - missing)
        if manifest["config"]["digest"] in missing:
            await store_blob(lambda: io.BytesIO(source.config_bytes), manifest["config"].get("mediaType", MEDIA_OCI_CONFIG),
                             manifest["config"]["digest"])
        for layer, descriptor in zip(source.layers, manifest.get("layers", [])):
            if descriptor["digest"] in missing:
                await store_blob(lambda layer=layer: source._open(layer.blob_name), descriptor.get("mediaType", ""),
                                 layer.digest)
    else:  # docker archive: make an OCI manifest for what it holds
        config = await store_blob(lambda: io.BytesIO(source.config_bytes), MEDIA_OCI_CONFIG, None)
        layers = [await store_blob(lambda layer=layer: source._open(layer.blob_name), "", None) for layer in source.layers]
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST, "config": config, "layers": layers}
    if index is not None:
        manifest = annotate_for_streaming(manifest, name, index)
    media_type = manifest.get("mediaType") or MEDIA_OCI_MANIFEST
    content = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    repository, _ = repository_and_tag(name)
    return await dist.put_manifest(repository, "", media_type, content), uploaded, stored, known
