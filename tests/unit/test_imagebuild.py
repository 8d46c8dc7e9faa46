"""imagebuild writers on a tiny hand-made tree (no debootstrap, no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from imagestream import oci
from imagestream_dev import imagebuild as ib

IS_ROOT = os.geteuid() == 0
MTIME = 1_600_000_000


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip"):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def _can_user_xattr(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir()
    (root / "dev").mkdir()
    (root / "etc/os-release").write_text("ID=test\n")
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "usr/bin/tool", 0o4755)  # setuid
    os.chmod(root / "tmp", 0o1777)  # sticky
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    os.symlink("usr/bin", root / "bin")
    os.symlink("../usr/bin/tool", root / "etc/dangling-ish")
    os.mkfifo(root / "dev/fifo")
    os.chmod(root / "dev/fifo", 0o600)
    (root / "big").write_bytes(os.urandom(100_000))
    if IS_ROOT:
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chmod(root / "dev/null", 0o666)  # mknod applies the umask
        os.chmod(root / "dev/loop0", 0o660)
        os.chown(root / "etc/os-release", 1234, 5678)
        os.lchown(root / "bin", 42, 43)
    for p in [*root.rglob("*"), root]:
        os.utime(p, (MTIME, MTIME), follow_symlinks=False)
    return root


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_is_deterministic(tree: Path, tmp_path: Path, compression: ib.Compression) -> None:
    a = ib.write_layer(tree, tmp_path / "a", compression=compression)
    b = ib.write_layer(tree, tmp_path / "b", compression=compression)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert a.digest == b.digest == _sha((tmp_path / "a").read_bytes())
    assert a.size == (tmp_path / "a").stat().st_size
    assert a.diff_id == _sha(_decompress((tmp_path / "a").read_bytes(), a.media_type))
    if compression == "gzip":
        raw = (tmp_path / "a").read_bytes()
        assert raw[4:8] == b"\0\0\0\0"  # gzip header mtime is zero
        assert not raw[3] & 0x08  # no FNAME
    if compression == "none":
        assert a.digest == a.diff_id


def test_layer_round_trips_metadata(tree: Path, tmp_path: Path) -> None:
    xattrs = _can_user_xattr(tree / "etc/os-release")
    if xattrs:
        os.setxattr(tree / "etc/os-release", "user.text", b"hello")
        os.setxattr(tree / "etc/os-release", "user.bin", b"\x00\xff\x01")
    layer = ib.write_layer(tree, tmp_path / "l.tar", compression="none")
    with tarfile.open(layer.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        big = tar.extractfile("big").read()  # type: ignore[union-attr]

    assert names == sorted(names, key=lambda n: n.split("/")), "entries must be sorted, parents first"
    assert "usr/bin/tool" in members and not any(n.startswith(("/", "./")) for n in names)
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    assert all(m.mtime == MTIME for m in members.values())
    assert big == (tree / "big").read_bytes()

    tool = members["usr/bin/tool"]
    assert tool.isreg() and tool.mode == 0o4755
    alias = members["usr/bin/tool-alias"]
    assert alias.islnk() and alias.linkname == "usr/bin/tool" and alias.size == 0
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["etc/dangling-ish"].linkname == "../usr/bin/tool"
    assert members["dev/fifo"].isfifo() and members["dev/fifo"].mode == 0o600
    if IS_ROOT:
        null, loop = members["dev/null"], members["dev/loop0"]
        assert null.ischr() and (null.devmajor, null.devminor) == (1, 3) and null.mode == 0o666
        assert loop.isblk() and (loop.devmajor, loop.devminor) == (7, 0)
        assert (members["etc/os-release"].uid, members["etc/os-release"].gid) == (1234, 5678)
        assert (members["bin"].uid, members["bin"].gid) == (42, 43)
    if xattrs:
        pax = members["etc/os-release"].pax_headers
        assert pax["SCHILY.xattr.user.text"] == "hello"
        raw = pax["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape")
        assert raw == b"\x00\xff\x01"
        assert not any(k.startswith("SCHILY.xattr") for k in members["big"].pax_headers)


def test_layer_filter_keeps_parents(tree: Path, tmp_path: Path) -> None:
    layer = ib.write_layer(tree, tmp_path / "l.tar", compression="none", paths=lambda r: r == "usr/bin/tool-alias")
    with tarfile.open(layer.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["usr", "usr/bin", "usr/bin/tool-alias"]
    # its hardlink partner is not in this layer, so the content must be a real file
    assert members["usr/bin/tool-alias"].isreg() and members["usr/bin/tool-alias"].size > 0


def _check_layout(layout: Path) -> tuple[dict, dict, list[bytes]]:
    """Structural OCI layout validation; returns (manifest, config, uncompressed layer tars)."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    blobs = layout / "blobs/sha256"
    for b in blobs.iterdir():
        assert _sha(b.read_bytes()) == "sha256:" + b.name, f"blob {b.name} does not match its name"
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2 and len(index["manifests"]) == 1
    desc = index["manifests"][0]
    assert desc["mediaType"] == oci.MEDIA_OCI_MANIFEST
    man_bytes = (blobs / desc["digest"].split(":")[1]).read_bytes()
    assert len(man_bytes) == desc["size"]
    manifest = json.loads(man_bytes)
    assert manifest["mediaType"] == oci.MEDIA_OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == oci.MEDIA_OCI_CONFIG
    cfg_bytes = (blobs / manifest["config"]["digest"].split(":")[1]).read_bytes()
    assert len(cfg_bytes) == manifest["config"]["size"]
    config = json.loads(cfg_bytes)
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert any(e.startswith("PATH=") for e in config["config"]["Env"]) and config["config"]["Cmd"]
    tars = []
    for ld in manifest["layers"]:
        data = (blobs / ld["digest"].split(":")[1]).read_bytes()
        assert len(data) == ld["size"]
        tars.append(_decompress(data, ld["mediaType"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [_sha(t) for t in tars]}
    return manifest, config, tars


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_oci_layout_valid_and_deterministic(tree: Path, tmp_path: Path, compression: ib.Compression) -> None:
    img = ib.write_oci_layout(tree, tmp_path / "a", compression=compression)
    ib.write_oci_layout(tree, tmp_path / "b", compression=compression)
    manifest, _, tars = _check_layout(tmp_path / "a")
    assert [l["mediaType"] for l in manifest["layers"]] == [oci.MEDIA_LAYER[compression]]
    assert img.manifest_digest == json.loads((tmp_path / "a/index.json").read_text())["manifests"][0]["digest"]
    assert not [p for p in (tmp_path / "a/blobs/sha256").iterdir() if p.name.startswith(".")]
    for rel in ["index.json", "oci-layout", *(f"blobs/sha256/{p.name}" for p in (tmp_path / "a/blobs/sha256").iterdir())]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as t:
        assert "usr/bin/tool" in t.getnames()


def test_oci_layout_split_layers(tree: Path, tmp_path: Path) -> None:
    ib.write_oci_layout(tree, tmp_path / "l", layers=[lambda r: r.startswith("usr/")], compression="gzip")
    _, _, tars = _check_layout(tmp_path / "l")
    assert len(tars) == 2
    first, second = (tarfile.open(fileobj=io.BytesIO(t)).getnames() for t in tars)
    assert "usr/bin/tool" in first and "etc/os-release" not in first
    assert "etc/os-release" in second and "usr/bin/tool" not in second


def test_oci_layout_from_hand_made_layers_with_whiteout(tmp_path: Path) -> None:
    def layer(path: Path, entries: dict[str, bytes]) -> Path:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
            for name, data in entries.items():
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), MTIME
                t.addfile(ti, io.BytesIO(data))
        return path

    l1 = layer(tmp_path / "1.tar", {"a.txt": b"a", "b.txt": b"b"})
    l2 = layer(tmp_path / "2.tar", {".wh.a.txt": b""})
    img = ib.write_oci_layout_from_layers([l1, l2], tmp_path / "out", compression="zstd")
    _, config, tars = _check_layout(tmp_path / "out")
    assert tars == [l1.read_bytes(), l2.read_bytes()]
    assert config["rootfs"]["diff_ids"] == [l.diff_id for l in img.layers]
    with pytest.raises(FileExistsError):
        ib.write_oci_layout_from_layers([l1], tmp_path / "out")


def test_oci_archive(tree: Path, tmp_path: Path) -> None:
    ib.write_oci_layout(tree, tmp_path / "layout")
    ib.write_oci_archive(tmp_path / "layout", tmp_path / "a.tar")
    ib.write_oci_archive(tmp_path / "layout", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as t:
        t.extractall(tmp_path / "x", filter="data")
        names = t.getnames()
    assert {"oci-layout", "index.json", "blobs", "blobs/sha256"} <= set(names)
    _check_layout(tmp_path / "x")


def test_docker_archive(tree: Path, tmp_path: Path) -> None:
    l1 = ib.write_layer(tree, tmp_path / "1.tar", compression="none", paths=lambda r: r.startswith("usr"))
    l2 = ib.write_layer(tree, tmp_path / "2.tar", compression="none", paths=lambda r: r.startswith("etc"))
    ib.write_docker_archive([l1.path, l2.path], tmp_path / "d.tar", "example/img:v1")
    ib.write_docker_archive([l1.path, l2.path], tmp_path / "d2.tar", "example/img:v1")
    assert (tmp_path / "d.tar").read_bytes() == (tmp_path / "d2.tar").read_bytes()
    with tarfile.open(tmp_path / "d.tar") as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert len(manifest) == 1
        entry = manifest[0]
        assert entry["RepoTags"] == ["example/img:v1"]
        cfg_bytes = t.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
        assert entry["Config"] == hashlib.sha256(cfg_bytes).hexdigest() + ".json"
        config = json.loads(cfg_bytes)
        layers = [t.extractfile(n).read() for n in entry["Layers"]]  # type: ignore[union-attr]
    assert entry["Layers"] == [f"{l.diff_id.split(':')[1]}/layer.tar" for l in (l1, l2)]
    assert layers == [l1.path.read_bytes(), l2.path.read_bytes()]
    assert config["rootfs"]["diff_ids"] == [l1.diff_id, l2.diff_id]
    assert config["os"] == "linux" and config["architecture"] == "amd64"


def test_filler_plan_is_exact_and_seeded() -> None:
    plan = ib.filler_plan(20, seed=7)
    assert sum(s for _, s in plan) == 20 << 20
    assert plan == ib.filler_plan(20, seed=7) and plan != ib.filler_plan(20, seed=8)
    sizes = [s for _, s in plan]
    assert sum(1 for s in sizes if s < 64 << 10) > 50 and max(sizes) >= 4 << 20
    assert len({p for p, _ in plan}) == len(plan)


def test_add_filler(tree: Path, tmp_path: Path) -> None:
    a = ib.add_filler(tree, tmp_path / "fa", 3, seed=1)
    b = ib.add_filler(tree, tmp_path / "fb", 3, seed=1)
    files = sorted(p for p in (a / "opt/filler").rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) == 3 << 20
    data = b"".join(p.read_bytes() for p in files)
    assert len(gzip.compress(data, 1)) > 0.99 * len(data), "filler must be incompressible"
    assert (a / "usr/bin/tool").stat().st_ino == (tree / "usr/bin/tool").stat().st_ino  # hardlinked copy
    assert not (tree / "opt").exists()  # the base is untouched
    la = ib.write_layer(a, tmp_path / "a.tar", compression="none")
    lb = ib.write_layer(b, tmp_path / "b.tar", compression="none")
    assert la.diff_id == lb.diff_id
    with pytest.raises(FileExistsError):
        ib.add_filler(tree, a, 1, seed=1)


def test_default_mirror_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ib.MIRROR_ENV, "http://mirror.example/debian")
    assert ib.default_mirror() == "http://mirror.example/debian"
