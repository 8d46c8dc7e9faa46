"""The Distribution gRPC service `push` writes blobs and manifests through."""

from __future__ import annotations

from chunk_store.distribution.blobs import Distribution
from imagestream.oci import BlobRecord
from imagestream.rpc.server import status_on_error
from imagestream.v1 import distribution_pb2, distribution_pb2_grpc


class DistributionServicer(distribution_pb2_grpc.DistributionServicer):
    def __init__(self, distribution: Distribution) -> None:
        self.distribution = distribution

    async def PutBlob(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            await self.distribution.put_blob(BlobRecord.from_proto(request.blob))
            return distribution_pb2.PutBlobResponse()

    async def PutManifest(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            digest = await self.distribution.put_manifest(request.repository, request.reference, request.media_type,
                                                          request.content)
            return distribution_pb2.PutManifestResponse(digest=digest)

    async def FindMissingBlobs(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            missing = await self.distribution.find_missing(request.digests)
            return distribution_pb2.FindMissingBlobsResponse(missing=missing)
