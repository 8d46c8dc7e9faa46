"""containerd's snapshots API as the stack's snapshotter serves it, called the way containerd calls it.

Plain (overlay) snapshots: prepare, view, mounts, commit, remove, stat, update, list (walk), usage, and
the overlay mounts they return really mount. Streamed snapshots: a layer labelled as containerd labels it
while unpacking is committed with ALREADY_EXISTS; containers on it share one FUSE mount of the image,
which goes when the last is removed; a restart of the snapshotter leaves no dead mount.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.conftest import needs_fuse
from imagestream_dev.stack import local
from tests.containerd.conftest import fuse_mounts_under, snapshotter_restart

pytestmark = [pytest.mark.services, needs_fuse]


def pb():  # type: ignore[no-untyped-def]
    from containerd.services.snapshots.v1 import snapshots_pb2

    return snapshots_pb2


def code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def prepare(snapshots, key: str, parent: str = "", labels=None):  # type: ignore[no-untyped-def]
    return snapshots.Prepare(pb().PrepareSnapshotRequest(snapshotter="imagestream", key=key, parent=parent,
                                                          labels=labels or {})).mounts


def options(mount) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in mount.options)


def mount_and_read(mounts, rel: str) -> bytes:  # type: ignore[no-untyped-def]
    """Mount what the snapshotter returned, as containerd would, and read a file."""
    target = tempfile.mkdtemp(prefix="imagestream-mnt-")
    (m,) = mounts
    subprocess.run(["mount", "-t", m.type, m.source, target, "-o", ",".join(m.options)], check=True)
    try:
        return (pathlib.Path(target) / rel).read_bytes()
    finally:
        subprocess.run(["umount", target], check=True)
        os.rmdir(target)


def test_plain_lifecycle(snapshots) -> None:  # type: ignore[no-untyped-def]
    S = pb()
    (base,) = prepare(snapshots, "t/base-active")
    assert base.type == "bind" and "rw" in base.options
    fs = pathlib.Path(base.source)
    (fs / "etc").mkdir()
    (fs / "etc/hello").write_bytes(b"from the base layer\n")
    assert code(lambda: prepare(snapshots, "t/base-active")) == grpc.StatusCode.ALREADY_EXISTS
    snapshots.Commit(S.CommitSnapshotRequest(key="t/base-active", name="t/base", labels={"layer": "base"}))
    info = snapshots.Stat(S.StatSnapshotRequest(key="t/base")).info
    assert info.kind == S.COMMITTED and info.labels["layer"] == "base" and info.parent == ""
    assert code(lambda: snapshots.Stat(S.StatSnapshotRequest(key="t/base-active"))) == grpc.StatusCode.NOT_FOUND
    usage = snapshots.Usage(S.UsageRequest(key="t/base"))
    assert usage.size >= 4096 and usage.inodes == 2

    (child,) = prepare(snapshots, "t/container", "t/base")
    o = options(child)
    assert child.type == "overlay" and o["lowerdir"] == str(fs) and "upperdir" in o and "workdir" in o
    assert mount_and_read([child], "etc/hello") == b"from the base layer\n"
    (view,) = snapshots.View(S.ViewSnapshotRequest(key="t/view", parent="t/base")).mounts
    assert view.type == "bind" and "ro" in view.options and view.source == str(fs)
    assert snapshots.Mounts(S.MountsRequest(key="t/container")).mounts[0] == child
    assert code(lambda: snapshots.Mounts(S.MountsRequest(key="t/base"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(lambda: snapshots.Commit(S.CommitSnapshotRequest(key="t/view", name="x"))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert code(lambda: prepare(snapshots, "t/orphan", "t/nope")) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: prepare(snapshots, "t/on-active", "t/container")) == grpc.StatusCode.INVALID_ARGUMENT

    # walk with containerd's filters; update labels by field path
    listed = [i.name for r in snapshots.List(S.ListSnapshotsRequest(filters=['labels.layer==base'])) for i in r.info]
    assert listed == ["t/base"]
    listed = [i.name for r in snapshots.List(S.ListSnapshotsRequest(filters=['parent=="t/base",kind==active']))
              for i in r.info]
    assert listed == ["t/container"]
    updated = snapshots.Update(S.UpdateSnapshotRequest(
        info=S.Info(name="t/base", labels={"gc": "keep"}), update_mask=field_mask_pb2.FieldMask(paths=["labels.gc"])))
    assert dict(updated.info.labels) == {"layer": "base", "gc": "keep"}
    assert code(lambda: snapshots.Update(S.UpdateSnapshotRequest(
        info=S.Info(name="t/base", parent="x"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])))) == \
        grpc.StatusCode.INVALID_ARGUMENT

    # removal: children first; the files go with the snapshot
    assert code(lambda: snapshots.Remove(S.RemoveSnapshotRequest(key="t/base"))) == grpc.StatusCode.FAILED_PRECONDITION
    upper = pathlib.Path(o["upperdir"])
    assert upper.is_dir()
    for key in ("t/container", "t/view", "t/base"):
        snapshots.Remove(S.RemoveSnapshotRequest(key=key))
    assert not upper.exists() and not fs.exists()
    assert not [i for r in snapshots.List(S.ListSnapshotsRequest(filters=['name~="^t/"'])) for i in r.info]


def streamed_labels(image: str, index: str, layer: str, ref: str) -> dict[str, str]:
    return {"containerd.io/snapshot.ref": ref, "containerd.io/snapshot/imagestream.image": image,
            "containerd.io/snapshot/imagestream.index": index, "containerd.io/snapshot/imagestream.layer": layer}


@pytest.fixture
def streamed_layer(snapshots, pushed_images):  # type: ignore[no-untyped-def]
    """The streamed image's (only) layer, committed by the snapshotter itself as containerd's unpack asks."""
    from imagestream import config
    from imagestream_cli.sandbox import describe

    image, _ = describe(pushed_images["streamed"])
    index = f"sha256:{image.index.hash}/{image.index.size_bytes}"
    ref = "sha256:" + "ab" * 32
    labels = streamed_labels(pushed_images["streamed"], index, "1/1", ref)
    assert code(lambda: prepare(snapshots, "extract-1 " + ref, "", labels)) == grpc.StatusCode.ALREADY_EXISTS
    yield ref, image, config.snapshotter_root()
    try:
        snapshots.Remove(pb().RemoveSnapshotRequest(key=ref))
    except grpc.RpcError:
        pass


def test_streamed_layer_is_committed_without_its_blob(snapshots, streamed_layer, pushed_images) -> None:  # type: ignore[no-untyped-def]
    S = pb()
    ref, image, root = streamed_layer
    info = snapshots.Stat(S.StatSnapshotRequest(key=ref)).info
    assert info.kind == S.COMMITTED and info.labels["containerd.io/snapshot.ref"] == ref
    assert info.labels["containerd.io/snapshot/imagestream.streamed"] == "true"
    # what containerd's metadata store looks for after ALREADY_EXISTS
    found = [i.name for r in snapshots.List(S.ListSnapshotsRequest(
        filters=[f'labels."containerd.io/snapshot.ref"=={ref},parent==""'])) for i in r.info]
    assert found == [ref]
    assert code(lambda: prepare(snapshots, "extract-2 " + ref, "", dict(info.labels))) == \
        grpc.StatusCode.ALREADY_EXISTS
    # a layer below the top of a streamed image cannot be a parent: the image is mounted whole
    low = "sha256:" + "cd" * 32
    index = f"sha256:{image.index.hash}/{image.index.size_bytes}"
    assert code(lambda: prepare(snapshots, "extract-3", "", streamed_labels(pushed_images["streamed"], index, "1/2",
                                                                               low))) == grpc.StatusCode.ALREADY_EXISTS
    assert code(lambda: prepare(snapshots, "t/on-low", low)) == grpc.StatusCode.FAILED_PRECONDITION
    snapshots.Remove(S.RemoveSnapshotRequest(key=low))


def leases_of(index_hash: str) -> list[str]:
    from fuse_client import attach

    attached, _, _ = attach.attachments()
    return next((a.leases for a in attached if a.index == index_hash), [])


def test_the_image_is_attached_at_pull_and_served_to_every_container_by_one_fuse_client(  # type: ignore[no-untyped-def]
        snapshots, streamed_layer) -> None:
    from fuse_client import attach
    from imagestream import config

    S = pb()
    ref, image, root = streamed_layer
    # committing the top layer (containerd's unpack at pull time) attached it: nothing is left to mount at run
    assert leases_of(image.index.hash) == ["snapshotter:" + image.index.hash]
    (c1,) = prepare(snapshots, "t/c1", ref)
    (c2,) = prepare(snapshots, "t/c2", ref)
    lower = options(c1)["lowerdir"]
    assert lower == options(c2)["lowerdir"] and pathlib.Path(lower).parent == config.fuse_mountpoint()
    assert fuse_mounts_under(root) == []  # no mount of its own: the node's one FUSE mount serves both
    assert b"PRETTY_NAME" in mount_and_read([c1], "etc/os-release")
    assert b"PRETTY_NAME" in mount_and_read([c2], "etc/os-release")
    _, _, pid = attach.attachments()
    assert pid == local.running_pid("fuse_client")
    snapshots.Remove(S.RemoveSnapshotRequest(key="t/c1"))
    snapshots.Remove(S.RemoveSnapshotRequest(key="t/c2"))
    assert leases_of(image.index.hash) == ["snapshotter:" + image.index.hash]  # the image is still pulled
    snapshots.Remove(S.RemoveSnapshotRequest(key=ref))
    # the image goes with its last pulled top layer (containerd's own pulls of it in other tests may hold it)
    pulled = [i for r in snapshots.List(S.ListSnapshotsRequest()) for i in r.info
              if i.labels.get("containerd.io/snapshot/imagestream.streamed") == "true"
              and image.index.hash in i.labels.get("containerd.io/snapshot/imagestream.index", "")]
    if not pulled:
        assert leases_of(image.index.hash) == []
        assert not pathlib.Path(lower).exists()


def test_restarts_leave_no_dead_mounts_and_new_containers_work(snapshots, streamed_layer) -> None:  # type: ignore[no-untyped-def]
    from containerd.services.snapshots.v1 import snapshots_pb2_grpc
    from imagestream import config

    S = pb()
    ref, image, root = streamed_layer
    (c,) = prepare(snapshots, "t/survivor", ref)
    lower = options(c)["lowerdir"]
    # a snapshotter restart keeps the image attached (running containers use it), by the same FUSE client
    fuse_pid = local.running_pid("fuse_client")
    snapshotter_restart()
    assert leases_of(image.index.hash) == ["snapshotter:" + image.index.hash]
    assert "usr" in os.listdir(lower)
    # the node's FUSE client restarts: its mount comes back, alive, with no dead one left behind
    local.down(lambda _: None, only="fuse_client")
    local.up(lambda _: None, only="fuse_client")
    assert local.running_pid("fuse_client") != fuse_pid
    assert [t for _, t in fuse_mounts_under(config.fuse_mountpoint())] == ["fuse.imagestream"]
    assert os.listdir(config.fuse_mountpoint()) == []  # its leases went with it
    # a new container on the image attaches it again
    (c2,) = prepare(snapshots, "t/after-restart", ref)
    assert options(c2)["lowerdir"] == lower and "usr" in os.listdir(lower)
    assert b"PRETTY_NAME" in mount_and_read([c2], "etc/os-release")
    # the snapshotter, restarted while a snapshot uses the image, attaches it again too
    local.down(lambda _: None, only="fuse_client")
    local.up(lambda _: None, only="fuse_client")
    snapshotter_restart()
    assert "usr" in os.listdir(lower)
    with grpc.insecure_channel("unix:" + str(config.snapshotter_socket())) as channel:  # the old one may back off
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        stub.Remove(S.RemoveSnapshotRequest(key="t/survivor"))
        stub.Remove(S.RemoveSnapshotRequest(key="t/after-restart"))


def test_a_lower_layer_of_a_streamed_image_is_unpacked_when_another_image_builds_on_it(  # type: ignore[no-untyped-def]
        snapshots, pushed_images) -> None:
    """An image that shares base layers with a streamed one, unpacked in the same namespace after it, sits on a
    lower layer of the streamed image: that layer is then unpacked from its blob (the regional endpoint's)."""
    import json
    import urllib.request

    from imagestream_cli.sandbox import describe
    from tests.containerd.conftest import registry_host

    S = pb()
    image, _ = describe(pushed_images["streamed"])
    index = f"sha256:{image.index.hash}/{image.index.size_bytes}"
    with urllib.request.urlopen(f"http://{registry_host()}/v2/debian-python/manifests/ctrd") as r:
        blob = json.load(r)["layers"][0]["digest"]
    low = "sha256:" + "ef" * 32
    labels = {**streamed_labels(pushed_images["streamed"], index, "1/2", low),
              "containerd.io/snapshot/imagestream.blob": blob}
    assert code(lambda: prepare(snapshots, "extract-4", "", labels)) == grpc.StatusCode.ALREADY_EXISTS
    (m,) = prepare(snapshots, "t/other-image-layer", low)
    lower = options(m)["lowerdir"]
    assert m.type == "overlay" and lower.endswith("/fs")  # the unpacked layer, not the FUSE mount
    assert b"PRETTY_NAME" in mount_and_read([m], "etc/os-release")
    assert snapshots.Usage(S.UsageRequest(key=low)).size > 100 << 20
    snapshots.Remove(S.RemoveSnapshotRequest(key="t/other-image-layer"))
    snapshots.Remove(S.RemoveSnapshotRequest(key=low))
    assert not pathlib.Path(lower).exists()
