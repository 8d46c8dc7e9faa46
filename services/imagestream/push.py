"""`imagestream push`: convert a source image and publish it to the regional store.

Order matters for "nothing half-published": every blob is read and checked
and the whole index built before anything is uploaded; chunks and the index
are uploaded before the name is published; the regional store itself refuses
to publish a name whose chunks are not all stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import time

from tqdm import tqdm

from imagestream import config, telemetry
from imagestream.convert import Converted, convert, temporary_spool
from imagestream.distribution import GrpcDistribution, push_blobs
from imagestream.grpc_client import GrpcChunkStore, GrpcImageRegistry
from imagestream.oci import open_image
from imagestream.registry import validate_name
from imagestream.v1 import images_pb2


@dataclasses.dataclass
class PushResult:
    image: images_pb2.Image
    converted: Converted
    uploaded_chunks: int
    uploaded_bytes: int
    convert_s: float
    upload_s: float
    manifest_digest: str = ""  # of the OCI manifest kept for pulls the normal way (imagestream.distribution)

    def summary(self) -> str:
        c = self.converted
        total = self.convert_s + self.upload_s
        return (
            f"pushed {self.image.name}: {c.files} files, {c.content_bytes / 1e6:.1f} MB in {len(c.chunks)} chunks; "
            f"uploaded {self.uploaded_chunks} new chunks ({self.uploaded_bytes / 1e6:.1f} MB compressed); "
            f"index sha256:{c.index_digest.hash[:12]}; {c.content_bytes / 1e6 / total:.1f} MB/s "
            f"(convert {self.convert_s:.1f} s, upload {self.upload_s:.1f} s); manifest {self.manifest_digest}"
        )


def push(source: str | pathlib.Path, name: str, registry: str | None = None, chunk_size: int | None = None,
         progress: bool = True, streaming: bool = True) -> PushResult:
    with telemetry.tracer.start_as_current_span("push") as span:
        if span.is_recording():
            span.set_attributes({"imagestream.image": name, "imagestream.source": str(source)})
        return _push(source, name, registry, chunk_size, progress, streaming)


def _push(source: str | pathlib.Path, name: str, registry: str | None, chunk_size: int | None,
          progress: bool, streaming: bool) -> PushResult:
    validate_name(name)
    registry = registry or config.get("registry")
    chunk_size = chunk_size or config.parse_size(config.get("chunk_size"))
    with open_image(source) as image_source, temporary_spool() as spool_dir:
        started = time.monotonic()
        with tqdm(total=len(image_source.layers), unit="layer", desc="convert", disable=not progress) as bar:
            converted, spool = convert(image_source, pathlib.Path(spool_dir), chunk_size,
                                       on_layer=lambda done, total: bar.update(1))
        convert_s = time.monotonic() - started
        started = time.monotonic()
        image, uploaded, uploaded_bytes, manifest = asyncio.run(
            _upload(converted, spool, name, registry, progress, streaming, image_source))
        return PushResult(image, converted, uploaded, uploaded_bytes, convert_s, time.monotonic() - started, manifest)


async def _upload(converted: Converted, spool, name: str, target: str, progress: bool, streaming: bool,  # type: ignore[no-untyped-def]
                  source):
    store = GrpcChunkStore(target, name="regional")
    registry = GrpcImageRegistry(target)
    dist = GrpcDistribution(target)
    try:
        wanted = [*converted.chunks, converted.index_digest]
        missing = []
        for i in range(0, len(wanted), 5000):
            missing += await store.find_missing(wanted[i : i + 5000])
        total = sum(spool.sizes.get(d) or spool.path(d).stat().st_size for d in missing)
        with tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress) as bar:

            def chunks():  # type: ignore[no-untyped-def]
                for digest in missing:
                    data = spool.read(digest)
                    bar.update(len(data))
                    yield digest, data

            await store.put_many(chunks())
        image = images_pb2.Image(name=name, index=converted.index_digest.to_proto(),
                                 source_digest=converted.source_digest, streaming_disabled=not streaming)
        published = await registry.publish(image)
        # what was received, kept for pulls the normal way; a streamable image's layers say so
        with tqdm(unit="B", unit_scale=True, desc="blobs", disable=not progress) as bar:
            manifest, _ = await push_blobs(source, store, dist, name, converted.index_digest if streaming else None,
                                           on_bytes=bar.update)
        return published, len(missing), total, manifest
    finally:
        await store.close()
        await registry.close()
        await dist.close()
