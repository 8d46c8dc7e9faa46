"""Which images stream: the contract between push, the regional tier and the node's snapshotter.

How a node tells a streamable image (the snapshotter's side of it): `push` adds
annotations to every layer descriptor of the manifest it stores, under the
prefix containerd passes on to snapshotters as labels while unpacking
(`containerd.io/snapshot/`):

    containerd.io/snapshot/imagestream.image   the imagestream name to mount
    containerd.io/snapshot/imagestream.index   the index it must point at (sha256:<hex>/<size>)
    containerd.io/snapshot/imagestream.layer   "<i>/<n>": this layer's place in the image
    containerd.io/snapshot/imagestream.blob    the layer's blob digest (to unpack it if it must be)

An image pushed with `--no-streaming` gets none, and is pulled and unpacked as usual.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from imagestream.digests import Digest, parse
from imagestream.errors import InvalidArgument
from imagestream.oci import check_digest

LABEL_PREFIX = "containerd.io/snapshot/imagestream."
LABEL_IMAGE = LABEL_PREFIX + "image"
LABEL_INDEX = LABEL_PREFIX + "index"
LABEL_LAYER = LABEL_PREFIX + "layer"
LABEL_BLOB = LABEL_PREFIX + "blob"  # the layer's own blob digest: to unpack it after all, if it must be


@dataclasses.dataclass(frozen=True)
class StreamedLayer:
    """A layer snapshot that is part of a streamable image (from the labels containerd passes)."""

    image: str
    index: Digest
    position: int  # 1-based
    count: int
    blob: str = ""  # the layer blob's digest ("sha256:<hex>"), if the manifest said

    @property
    def is_top(self) -> bool:
        return self.position == self.count

    def labels(self) -> dict[str, str]:
        labels = {LABEL_IMAGE: self.image, LABEL_INDEX: f"sha256:{self.index.hash}/{self.index.size}",
                  LABEL_LAYER: f"{self.position}/{self.count}"}
        if self.blob:
            labels[LABEL_BLOB] = self.blob
        return labels

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> StreamedLayer | None:
        """None unless all three labels are there; InvalidArgument if they are there but malformed."""
        if not all(k in labels for k in (LABEL_IMAGE, LABEL_INDEX, LABEL_LAYER)):
            return None
        m = re.fullmatch(r"sha256:([0-9a-f]{64})/(\d+)", labels[LABEL_INDEX])
        n = re.fullmatch(r"(\d+)/(\d+)", labels[LABEL_LAYER])
        if not m or not n or not 1 <= int(n.group(1)) <= int(n.group(2)):
            raise InvalidArgument(f"malformed imagestream labels: {labels[LABEL_INDEX]!r}, {labels[LABEL_LAYER]!r}")
        blob = labels.get(LABEL_BLOB, "")
        return cls(labels[LABEL_IMAGE], parse(m.group(1), int(m.group(2))), int(n.group(1)), int(n.group(2)),
                   check_digest(blob) if blob else "")


def annotate_for_streaming(manifest: dict[str, Any], name: str, index: Digest) -> dict[str, Any]:
    """A copy of `manifest` whose layer descriptors say which streamed image they belong to."""
    out = json.loads(json.dumps(manifest))
    layers = out.get("layers") or []
    for i, layer in enumerate(layers, 1):
        layer["annotations"] = {**(layer.get("annotations") or {}),
                                **StreamedLayer(name, index, i, len(layers), layer.get("digest", "")).labels()}
    return out
