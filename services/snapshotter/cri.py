"""Pull an image through containerd's CRI plugin, as the kubelet does (runtime.v1.ImageService/PullImage).

This is the path on which containerd's unpacker hands a snapshotter the layers'
labels, so that a streamable image's layer blobs are never fetched. (containerd
1.6's `ctr images pull` fetches every blob first and unpacks without those
labels; the image then runs from its unpacked layers: the fallback path.)
"""

from __future__ import annotations

import grpc

from cri.runtime.v1 import images_pb2, images_pb2_grpc


def pull(containerd_socket: str, ref: str, timeout_s: float = 600) -> str:
    """The image's reference as CRI reports it (the config digest); raises grpc.RpcError on failure."""
    with grpc.insecure_channel("unix:" + containerd_socket) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        reply = stub.PullImage(images_pb2.PullImageRequest(image=images_pb2.ImageSpec(image=ref)), timeout=timeout_s)
    return reply.image_ref
