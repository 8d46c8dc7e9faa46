"""OCI whiteouts: which layer entries are whiteouts, and what each one hides.

The one rule for both the converter (which flattens layers into the streamed
tree) and the snapshotter's unpacker (which turns a layer into an overlayfs lower
directory), so that the streamed view and the unpacked view of an image agree.

From the OCI image spec: `DIR/.wh.NAME` hides `DIR/NAME` of the lower layers;
`DIR/.wh..wh..opq` hides every lower entry below DIR. A whiteout applies to lower
layers only: an entry the same layer adds stays, whatever the order of the two
in the tar. So when the layer itself adds the whited-out name:
- as a directory, that directory stays and only what lower layers hold beneath it
  is hidden (as if it were opaque);
- as anything else, it already shadows the lower entry and nothing more is hidden.
"""

from __future__ import annotations

import dataclasses
import enum

from imagestream.errors import BadImage

PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclasses.dataclass(frozen=True)
class Whiteout:
    """A whiteout entry of a layer."""

    target: str  # the entry it hides (clean relative path), or for an opaque one the directory it empties
    opaque: bool


def parse(path: str) -> Whiteout | None:
    """The whiteout a clean relative layer path ("a/b/.wh.c") is, or None for an ordinary entry; BadImage
    for a whiteout that names no entry."""
    directory, _, name = path.rpartition("/")
    if name == OPAQUE:
        return Whiteout(directory, True)
    if not name.startswith(PREFIX):
        return None
    hidden = name.removeprefix(PREFIX)
    if hidden in ("", ".", ".."):  # would reach the directory itself or its parent
        raise BadImage(f"whiteout {path!r} names no entry")
    return Whiteout(f"{directory}/{hidden}" if directory else hidden, False)


class Layered(enum.Enum):
    """What the whiteout's own layer has at its target."""

    NOTHING = "nothing"
    DIRECTORY = "directory"
    OTHER = "other"  # a file, link, device, ...


class Effect(enum.Enum):
    REMOVE = "remove"  # the lower entry goes altogether (overlayfs: a 0/0 character device in its place)
    EMPTY = "empty"  # the layer's directory stays, lower entries below it go (overlayfs: trusted.overlay.opaque=y)
    NONE = "none"  # the layer's own entry already shadows the lower one


def effect(whiteout: Whiteout, layered: Layered) -> Effect:
    """What `whiteout` does, given what its layer has (so far, for a streaming reader) at its target."""
    if whiteout.opaque or layered is Layered.DIRECTORY:
        return Effect.EMPTY
    if layered is Layered.OTHER:
        return Effect.NONE
    return Effect.REMOVE
