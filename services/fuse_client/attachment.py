"""What the node's FUSE client says of an attached image, for its callers (no gRPC or protobuf imports)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from imagestream.errors import Unavailable


class NotServing(Unavailable):
    """No FUSE client answers on this node."""


class Attached(NamedTuple):  # not a dataclass: `dataclasses` imports `inspect`, 10 ms of a container start
    """An image attached to the node's FUSE client: its directory in the node's mount is `path`."""

    image: str
    lease: str
    path: str
    index: str
    attach_seconds: float
    inodes: int
    has_profile: bool
    recording_profile: bool
    download_id: str
    leases: list[str]
    config: dict
    pid: int  # of the node's FUSE client

    @classmethod
    def from_json(cls, doc: dict[str, Any], lease: str = "") -> Attached:
        """From the proto JSON mapping of an Attachment (the proto's field names; defaults left out)."""
        index = doc.get("index")
        return cls(str(doc.get("image", "")), lease, str(doc.get("path", "")),
                   str(index.get("hash", "")) if isinstance(index, dict) else "",
                   float(doc.get("attach_seconds", 0.0)), int(doc.get("inodes", 0)), bool(doc.get("has_profile")),
                   bool(doc.get("recording_profile")), str(doc.get("download_id", "")), list(doc.get("leases", [])),
                   json.loads(doc.get("config_json") or "{}"), int(doc.get("pid", 0)))
