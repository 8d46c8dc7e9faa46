"""The snapshotter: containerd's snapshot semantics, with streamed images as one shared FUSE mount.

Two kinds of layer snapshot:

* **streamed** — containerd unpacks an image and prepares a layer snapshot with the
  labels `containerd.io/snapshot.ref` (the chain ID it wants) and, from the layer's
  annotations, `containerd.io/snapshot/imagestream.*` (see imagestream.snapshot_labels).
  If the node can stream (FUSE) and the regional store still names that image at
  that index, the snapshotter commits the layer itself, with no files, and answers
  ALREADY_EXISTS: containerd skips fetching and unpacking the layer, as it does for
  every remote snapshotter. Committing the top layer attaches the image to the
  node's FUSE client, so a container on it starts with nothing left to mount: it
  gets the image's directory in the node's FUSE mount (shared by every container
  on the image) as its lower dir, under a writable overlay.
* **plain** — anything else: an overlay snapshotter, as containerd's own overlayfs
  (layers unpacked by containerd into `fs/`, containers as overlay upper dirs).
  That is the fallback: every image runs, streamed or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable

from imagestream import config, telemetry
from imagestream.snapshot_labels import LABEL_PREFIX, StreamedLayer
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound

from snapshotter import filters
from snapshotter.image_mounts import ImageMounts
from snapshotter.metadata import ACTIVE, COMMITTED, VIEW, Metadata, Snapshot

log = logging.getLogger("snapshotter")

LABEL_REF = "containerd.io/snapshot.ref"
LABEL_STREAMED = LABEL_PREFIX + "streamed"  # set on the layers this snapshotter committed itself


class AlreadyExists(ImagestreamError):
    pass


@dataclasses.dataclass
class Mount:
    type: str
    source: str
    options: list[str]


@dataclasses.dataclass
class Counters:
    """What `python -m snapshotter status` shows (also written to <root>/status.json)."""

    streamed_layers: int = 0  # layer snapshots committed without fetching their blob
    streamed_snapshots: int = 0  # containers (active/view snapshots) started on a streamed image
    plain_snapshots: int = 0  # containers and unpacks the overlay way (the fallback)
    streaming_declined: int = 0  # layers labelled streamable that were unpacked after all (see the log)
    materialized_layers: int = 0  # lower layers of streamed images unpacked after all (shared by another image)
    image_mounts: int = 0  # images attached to the node's FUSE client
    image_mount_seconds: float = 0.0


def _du(path: pathlib.Path) -> tuple[int, int]:
    """Bytes (by blocks, as containerd counts) and inodes under path."""
    size, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


class Snapshotter:
    def __init__(self, root: pathlib.Path, streaming_check=None) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        (root / "snapshots").mkdir(parents=True, exist_ok=True)
        self.meta = Metadata(root / "metadata.db")
        self.counters = Counters()
        self._images_mounted = 0
        self.images = ImageMounts(root, on_mount=self._mounted)
        # called with (key, image) when a container's snapshot is prepared on a streamed image (kube_events)
        self.on_streamed_container: Callable[[str, str], object] | None = None
        self._lock = asyncio.Lock()
        # (image, index) -> None if it can stream here, else why not; see `_can_stream`
        self.streaming_check = streaming_check or _streaming_check

    # -- paths -------------------------------------------------------------
    def _dir(self, s: Snapshot) -> pathlib.Path:
        return self.root / "snapshots" / str(s.id)

    def _mounted(self, layer: StreamedLayer, seconds: float) -> None:
        self.counters.image_mounts += 1
        self.counters.image_mount_seconds += seconds
        log.info("ImageStreaming: attached %s (index %s) in %.3f s; its containers start without pulling it",
                 layer.image, layer.index.hash[:12], seconds)
        self._save_status()

    def _save_status(self) -> None:
        status = {**dataclasses.asdict(self.counters),
                  "images_mounted": sorted(self.meta.images_in_use())}
        self._images_mounted = len(status["images_mounted"])
        tmp = self.root / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, self.root / "status.json")

    def metric_families(self):  # type: ignore[no-untyped-def]
        """The counters as Prometheus families (imagestream_snapshotter_*), read at scrape time."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        helps = {"streamed_layers": "Layer snapshots committed without fetching their blob (streamed images)",
                 "streamed_snapshots": "Containers (active or view snapshots) started on a streamed image",
                 "plain_snapshots": "Snapshots prepared the overlay way (the fallback)",
                 "streaming_declined": "Layers labelled streamable that containerd unpacked after all",
                 "materialized_layers": "Lower layers of streamed images unpacked because another image builds on them",
                 "image_mounts": "Streamed images attached to the node's FUSE client"}
        for name, text in helps.items():
            yield CounterMetricFamily(f"imagestream_snapshotter_{name}", text, value=getattr(self.counters, name))
        # scrapes come on another thread: the gauge is the value _save_status last saw, not a database read
        yield GaugeMetricFamily("imagestream_snapshotter_images_mounted", "Streamed images mounted for containers now",
                                value=self._images_mounted)

    def _get(self, key: str) -> Snapshot:
        s = self.meta.get(key)
        if s is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return s

    # -- mounts ------------------------------------------------------------
    def _chain(self, parent: str) -> tuple[list[pathlib.Path], StreamedLayer | None]:
        """Lower dirs for a snapshot on `parent` (top first) and the streamed image at their bottom, if any."""
        lowers: list[pathlib.Path] = []
        key = parent
        while key:
            s = self._get(key)
            if s.streamed is not None:
                if not s.streamed.is_top:
                    raise FailedPrecondition(
                        f"snapshot {key!r} is layer {s.streamed.position} of {s.streamed.count} of the streamed image "
                        f"{s.streamed.image!r}; a streamed image is mounted whole, on its top layer only")
                return lowers, s.streamed
            lowers.append(self._dir(s) / "fs")
            key = s.parent
        return lowers, None

    async def _mounts(self, s: Snapshot) -> list[Mount]:
        lowers, streamed = self._chain(s.parent)
        if streamed is not None:
            lowers.append(await self.images.ensure(streamed))
        fs, work = self._dir(s) / "fs", self._dir(s) / "work"
        if s.kind == ACTIVE:
            if not lowers:
                return [Mount("bind", str(fs), ["rbind", "rw"])]
            return [Mount("overlay", "overlay", [f"workdir={work}", f"upperdir={fs}",
                                                 "lowerdir=" + ":".join(map(str, lowers))])]
        if not lowers:  # an empty read-only view
            return [Mount("bind", str(fs), ["rbind", "ro"])]
        if len(lowers) == 1:
            return [Mount("bind", str(lowers[0]), ["rbind", "ro"])]
        return [Mount("overlay", "overlay", ["lowerdir=" + ":".join(map(str, lowers))])]

    # -- the API -----------------------------------------------------------
    async def prepare(self, key: str, parent: str, labels: dict[str, str], kind: int = ACTIVE) -> list[Mount]:
        if not key:
            raise InvalidArgument("a snapshot needs a key")
        telemetry.annotate(snapshot_key=key, snapshot_parent=parent)  # on the span of containerd's call
        async with self._lock:
            if self.meta.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            if parent:
                p = self._get(parent)
                if p.kind != COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            if kind == ACTIVE:
                await self._maybe_stream_layer(parent, labels)
            await self._materialize_lower_layers(parent)
            lowers, streamed = self._chain(parent)
            s = self.meta.add(key, parent, kind, labels, image_index=streamed.index.hash if streamed else "")
            try:
                (self._dir(s) / "fs").mkdir(parents=True)
                if kind == ACTIVE:
                    (self._dir(s) / "work").mkdir()
                mounts = await self._mounts(s)
            except BaseException:
                self.meta.remove(key)
                shutil.rmtree(self._dir(s), ignore_errors=True)
                raise
            if streamed is not None:
                telemetry.annotate(image=streamed.image, streamed=True)
                self.counters.streamed_snapshots += 1
                log.info("ImageStreaming: %s snapshot %s runs on the streamed image %s (overlay on its mount)",
                         "active" if kind == ACTIVE else "view", key, streamed.image)
                if kind == ACTIVE and self.on_streamed_container is not None:
                    self.on_streamed_container(key, streamed.image)
            else:
                self.counters.plain_snapshots += 1
            self._save_status()
            return mounts

    async def _maybe_stream_layer(self, parent: str, labels: dict[str, str]) -> None:
        """The remote-snapshotter step: commit a streamable layer here and say ALREADY_EXISTS."""
        target = labels.get(LABEL_REF)
        layer = StreamedLayer.from_labels(labels)
        if not target or layer is None:
            return
        if self.meta.get(target) is not None:
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        # its answer when streamed is ALREADY_EXISTS, which is no failure
        with telemetry.tracer.start_as_current_span("stream layer", record_exception=False,
                                                    set_status_on_exception=False) as span:
            telemetry.annotate(image=layer.image, layer=f"{layer.position}/{layer.count}", target=target)
            await self._stream_layer(target, parent, labels, layer)
            span.set_attribute("imagestream.streamed", False)  # declined: containerd unpacks it

    async def _stream_layer(self, target: str, parent: str, labels: dict[str, str], layer: StreamedLayer) -> None:
        reason = await self.streaming_check(layer)
        if reason is not None:
            telemetry.annotate(declined=reason)
            self.counters.streaming_declined += 1
            log.warning("not streaming layer %d/%d of %s: %s; containerd unpacks it instead",
                        layer.position, layer.count, layer.image, reason)
            return
        self.meta.add(target, parent, COMMITTED, {**labels, LABEL_STREAMED: "true"}, streamed=layer)
        self.counters.streamed_layers += 1
        log.info("ImageStreaming: layer %d/%d of %s committed as %s without fetching its blob",
                 layer.position, layer.count, layer.image, target)
        self._save_status()
        if layer.is_top:  # attached now, at pull time: `ctr run` has nothing left to mount
            try:
                await self.images.ensure(layer)
            except FailedPrecondition as e:
                log.warning("%s; attached when a container needs it", e)
        telemetry.annotate(streamed=True)
        raise AlreadyExists(f"target snapshot {target!r} is streamed from {layer.image}")

    async def _materialize_lower_layers(self, parent: str) -> None:
        """A lower layer of a streamed image as a parent (an image that shares base layers with a streamed one,
        unpacked in the same namespace after it): it cannot be the image's mount, so unpack it after all."""
        key = parent
        while key:
            s = self._get(key)
            if s.streamed is not None:
                if not s.streamed.is_top:
                    await self._materialize(s)
                return
            key = s.parent

    async def _materialize(self, s: Snapshot) -> None:
        from snapshotter import unpack

        assert s.streamed is not None
        if s.parent and (p := self._get(s.parent)).streamed is not None:
            await self._materialize(p)
        layer = s.streamed
        registry = config.get("distribution_listen")
        if not layer.blob or not registry:
            raise FailedPrecondition(f"snapshot {s.key!r} is layer {layer.position}/{layer.count} of the streamed "
                                     f"image {layer.image!r} and cannot be unpacked here (no blob digest or registry)")
        d = self._dir(s)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        blob = d / "blob.tmp"
        try:
            await asyncio.to_thread(unpack.fetch_blob, registry, layer.blob, blob)
            await asyncio.to_thread(unpack.unpack, blob, d / "fs.tmp")
            os.rename(d / "fs.tmp", d / "fs")
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        finally:
            blob.unlink(missing_ok=True)
        size, inodes = await asyncio.to_thread(_du, d / "fs")
        self.meta.materialized(s.key, size, inodes)
        self.counters.materialized_layers += 1
        log.info("layer %d/%d of the streamed image %s unpacked from its blob (%s): a snapshot of another image "
                 "sits on it", layer.position, layer.count, layer.image, layer.blob[:19])
        self._save_status()

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return await self.prepare(key, parent, labels, kind=VIEW)

    async def mounts(self, key: str) -> list[Mount]:
        s = self._get(key)
        if s.kind == COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed: it has no mounts, prepare a child of it")
        return await self._mounts(s)

    async def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        async with self._lock:
            s = self._get(key)
            if s.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active: only an active snapshot can be committed")
            if self.meta.get(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            telemetry.annotate(snapshot_key=key, name=name)
            size, inodes = await asyncio.to_thread(_du, self._dir(s) / "fs")
            committed = self.meta.commit(key, name, labels or s.labels, size, inodes)
            shutil.rmtree(self._dir(s) / "work", ignore_errors=True)
            await self._release_if_unused(s.image_index)
            return committed

    async def remove(self, key: str) -> None:
        async with self._lock:
            s = self._get(key)
            children = self.meta.children(key)
            if children:
                raise FailedPrecondition(f"snapshot {key!r} has children ({children[0]!r}); remove them first")
            self.meta.remove(key)
            await asyncio.to_thread(shutil.rmtree, self._dir(s), True)
            await self._release_if_unused(s.image_index or (s.streamed.index.hash if s.streamed else ""))
            self._save_status()

    def _pulled_images(self) -> dict[str, StreamedLayer]:
        """Index hash -> top layer, of every streamed image whose top layer is committed here (pulled)."""
        return {s.streamed.index.hash: s.streamed for s in self.meta.all()
                if s.kind == COMMITTED and s.streamed is not None and s.streamed.is_top}

    async def _release_if_unused(self, index_hash: str) -> None:
        if index_hash and not self.meta.users_of_image(index_hash) and index_hash not in self._pulled_images():
            await self.images.release(index_hash)

    def stat(self, key: str) -> Snapshot:
        return self._get(key)

    async def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        async with self._lock:
            s = self._get(key)
            if not paths or "labels" in paths:
                new = dict(labels)
            else:
                new = dict(s.labels)
                for path in paths:
                    if not path.startswith("labels."):
                        raise InvalidArgument(f"cannot update field {path!r}: only labels are mutable")
                    label = path.removeprefix("labels.")
                    if label in labels:
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
            return self.meta.set_labels(key, new)

    def walk(self, filter_texts: list[str]) -> list[Snapshot]:
        match = filters.matcher(filter_texts)
        return [s for s in self.meta.all() if match(s.fields())]

    async def usage(self, key: str) -> tuple[int, int]:
        s = self._get(key)
        if s.kind == COMMITTED:
            return s.size, s.inodes
        return await asyncio.to_thread(_du, self._dir(s) / "fs")

    async def cleanup(self, remount: bool = True) -> None:
        """Remove folders no snapshot owns and image mounts no snapshot uses (and dead ones: mounted again
        if still used, unless `remount` is off, as on the way out)."""
        async with self._lock:
            owned = {str(s.id) for s in self.meta.all()}
            for d in (self.root / "snapshots").iterdir():
                if d.name not in owned:
                    log.info("cleanup: removing %s (no snapshot owns it)", d)
                    await asyncio.to_thread(shutil.rmtree, d, True)
            await self.images.reconcile(self._images_in_use(), remount)

    def _images_in_use(self) -> dict[str, StreamedLayer]:
        in_use: dict[str, StreamedLayer] = self._pulled_images()
        for s in self.meta.all():
            if s.kind != COMMITTED and s.image_index and s.image_index not in in_use:
                _, streamed = self._chain(s.parent)
                if streamed is not None:
                    in_use[s.image_index] = streamed
        return in_use

    async def start(self) -> None:
        """After a (re)start: no dead mounts, and every image in use mounted again."""
        await self.cleanup()
        self._save_status()

    def close(self) -> None:
        self.meta.close()


async def _streaming_check(layer: StreamedLayer) -> str | None:
    """None if this node can stream the layer's image now, else why not (then it is unpacked as usual)."""
    from imagestream.digests import Digest
    from imagestream.rpc.client import GrpcImageNames
    from fuse_client.availability import streaming_unavailable_reason

    reason = streaming_unavailable_reason(False)
    if reason is not None:
        return reason
    names = GrpcImageNames("unix:" + config.node_cache_socket(), timeout_s=10)
    try:
        image = await names.resolve(layer.image)
    except ImagestreamError as e:
        return f"the image cannot be resolved ({e})"
    finally:
        await names.close()
    if image.streaming_disabled:
        return "the image was pushed with streaming disabled"
    if Digest.from_proto(image.index) != layer.index:
        return f"{layer.image} now points at another index ({image.index.hash[:12]}, not {layer.index.hash[:12]})"
    return None
