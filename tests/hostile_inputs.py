"""Hostile source images and crafted indexes, each with the clear error it must get.

ARCHIVES: (id, build(dir) -> path of the source image, fragment of the expected message).
INDEXES: (id, build() -> ImageIndex, fragment of the expected message).
Used by the unit tests (convert, index_checks) and by the CLI campaign on the real stack.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pathlib
import tarfile
from collections.abc import Callable
from typing import Any

from imagestream.digests import Digest
from imagestream.v1 import index_pb2

T = index_pb2.Inode
Entry = tuple[tarfile.TarInfo, bytes | None]


# -- tars and layouts -----------------------------------------------------------------

def info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "", pax: dict | None = None,
         **fields: Any) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.size, i.linkname, i.mode, i.mtime = kind, size, linkname, 0o644, 1_600_000_000
    i.pax_headers = pax or {}
    for k, v in fields.items():
        setattr(i, k, v)
    return i


def file(name: str, data: bytes = b"x", **kw: Any) -> Entry:
    return info(name, size=len(data), **kw), data


def tar_bytes(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def raw_tar(headers: list[tuple[str, bytes, dict[str, str]]]) -> bytes:
    """A tar whose PAX records are written by hand (tarfile refuses to write some hostile values)."""
    out = bytearray()
    for name, data, pax in headers:
        if pax:
            records = b"".join(_pax_record(k, v) for k, v in pax.items())
            out += _header("PaxHeader/x", len(records), b"x") + records + bytes(-len(records) % 512)
        out += _header(name, len(data), b"0") + data + bytes(-len(data) % 512)
    return bytes(out + bytes(1024))


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _header(name: str, size: int, kind: bytes) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = f"{size:011o}\0".encode()
    h[136:148] = b"13567342400\0"
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Doc = Any  # a JSON value, or bytes written as they are


def oci(out: pathlib.Path, layers: list[bytes], *, compress: Callable[[bytes], bytes] = lambda b: gzip.compress(b, mtime=0),
        config: Callable[[dict], Doc] = lambda c: c, manifest: Callable[[dict], Doc] = lambda m: m,
        index: Callable[[dict], Doc] = lambda i: i, blob_bytes: Callable[[int, bytes], bytes] = lambda n, b: b,
        diff_ids: Callable[[list], list] = lambda d: d, layout: bool = True) -> pathlib.Path:
    """An OCI image layout of `layers` (uncompressed tars); each document can be changed on its way out."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return sha(data)

    def encode(doc: Doc) -> bytes:
        return doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    descriptors = []
    for n, layer in enumerate(layers):
        blob = compress(layer)
        digest = sha(blob)
        (blobs / digest[7:]).write_bytes(blob_bytes(n, blob))
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": len(blob)})
    cfg = config({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids([sha(t) for t in layers])}})
    cfg_bytes = encode(cfg)
    man = manifest({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg_bytes),
                               "size": len(cfg_bytes)},
                    "layers": descriptors})
    man_bytes = encode(man)
    idx = index({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(man_bytes), "size": len(man_bytes)}]})
    (out / "index.json").write_bytes(encode(idx))
    if layout:
        (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return out


def docker(out: pathlib.Path, layers: list[bytes], manifest: Callable[[list], Doc] = lambda m: m,
           config: Callable[[dict], Doc] = lambda c: c, omit: tuple[str, ...] = ()) -> pathlib.Path:
    """A `docker save` archive of `layers`."""
    files: dict[str, bytes] = {}
    names = []
    for n, layer in enumerate(layers):
        names.append(f"layer{n}/layer.tar")
        files[names[-1]] = layer
    cfg = config({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}})
    cfg_bytes = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    files[cfg_name] = cfg_bytes
    man = manifest([{"Config": cfg_name, "RepoTags": ["x:latest"], "Layers": names}])
    files["manifest.json"] = man if isinstance(man, bytes) else json.dumps(man).encode()
    path = out / "image.tar"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            if name not in omit:
                tar.addfile(info(name, size=len(data)), io.BytesIO(data))
    return path


def plain_tar(out: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "image.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            tar.addfile(info(name, size=len(data)), io.BytesIO(data))
    return path


OK = tar_bytes([file("etc/ok", b"fine\n")])


def _one(entries: list[Entry], **kw: Any) -> Callable[[pathlib.Path], pathlib.Path]:
    return lambda d: oci(d, [tar_bytes(entries)], **kw)


def _nested_index(d: pathlib.Path) -> pathlib.Path:
    """Image indexes that point at image indexes, five deep."""
    path = oci(d, [OK])
    blobs = d / "blobs" / "sha256"
    top = json.loads((d / "index.json").read_text())
    for _ in range(5):
        data = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": top["manifests"]}).encode()
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        top = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                                   "digest": sha(data), "size": len(data)}]}
    (d / "index.json").write_text(json.dumps(top))
    return path


def _deep_dirs(levels: int) -> bytes:
    return tar_bytes([(info("/".join(["d"] * levels) + "/f", size=1), b"x")])


def _with(doc_path: tuple, value: Any) -> Callable[[dict], Any]:
    """A change to a document: set doc[a][b]... = value."""
    def change(doc: dict) -> Any:
        target = doc
        for key in doc_path[:-1]:
            target = target[key]
        target[doc_path[-1]] = value
        return doc
    return change


BOMB_MIB = 64  # with IMAGESTREAM_MAX_UNPACKED_BYTES below it (see BOMB_ENV)
BOMB_ENV = {"IMAGESTREAM_MAX_UNPACKED_BYTES": "16MiB"}


def _bomb(d: pathlib.Path) -> pathlib.Path:
    size = BOMB_MIB << 20
    header = tar_bytes([(info("zeros", size=size), None)])[:512]  # the member's header only
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(header)
        zeros = bytes(1 << 20)
        for _ in range(BOMB_MIB):
            gz.write(zeros)
        gz.write(bytes(1024))
    blob = stream.getvalue()
    return oci(d, [b""], compress=lambda _: blob, diff_ids=lambda ids: ["sha256:" + "0" * 64])


ARCHIVES: list[tuple[str, Callable[[pathlib.Path], pathlib.Path], str]] = [
    # entries in layers
    ("absolute-path", _one([file("/etc/passwd")]), "'/etc/passwd': absolute path"),
    ("dotdot-path", _one([file("../escape")]), "'..' in path escapes the image root"),
    ("dotdot-inner", _one([file("a/../../escape")]), "'..' in path escapes the image root"),
    ("symlink-escapes", _one([(info("link", tarfile.SYMTYPE, linkname="../../etc"), None)]), "escapes the image root"),
    ("symlink-empty", _one([(info("link", tarfile.SYMTYPE, linkname=""), None)]), "symlink with an empty target"),
    ("hardlink-dotdot", _one([(info("h", tarfile.LNKTYPE, linkname="../etc/passwd"), None)]), "'..' in path"),
    ("hardlink-missing", _one([(info("h", tarfile.LNKTYPE, linkname="etc/none"), None)]), "is not in the image"),
    ("hardlink-to-dir", _one([(info("d", tarfile.DIRTYPE), None), (info("h", tarfile.LNKTYPE, linkname="d"), None)]),
     "hardlink to directory"),
    ("chardev-outside-dev", _one([(info("etc/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None)]),
     "character device outside /dev"),
    ("blockdev-outside-dev", _one([(info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)]),
     "block device outside /dev"),
    ("unknown-entry-type", _one([(info("weird", b"Z"), None)]), "unsupported tar entry type"),
    ("parent-not-dir", _one([file("a"), file("a/b")]), "parent 'a' is not a directory"),
    ("name-4096-bytes", _one([file("n" * 4096)]), "a name longer than 255 bytes"),
    ("path-5000-bytes", _one([file("/".join(["p" * 99] * 50))]), "path longer than 4096 bytes"),
    ("nested-10000-dirs", lambda d: oci(d, [_deep_dirs(10_000)]), "path longer than 4096 bytes"),
    ("nested-600-dirs", lambda d: oci(d, [_deep_dirs(600)]), "deeper than 512 directories"),
    ("pax-mtime-nan", lambda d: oci(d, [raw_tar([("f", b"x", {"mtime": "nan"})])]), "is not a time"),
    ("pax-mtime-inf", lambda d: oci(d, [raw_tar([("f", b"x", {"mtime": "inf"})])]), "is not a time"),
    ("pax-mtime-huge", lambda d: oci(d, [raw_tar([("f", b"x", {"mtime": "1e400"})])]), "is not a time"),
    ("pax-uid-2-to-the-40", lambda d: oci(d, [raw_tar([("f", b"x", {"uid": str(2**40)})])]), "uid 1099511627776 is out of range"),
    ("pax-gid-2-to-the-40", lambda d: oci(d, [raw_tar([("f", b"x", {"gid": str(2**40)})])]), "gid 1099511627776 is out of range"),
    ("xattr-steers-overlay", _one([file("f", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})]),
     "would steer overlayfs"),
    ("member-truncated", lambda d: oci(d, [tar_bytes([file("f", b"y" * 5000)])[:1536]]), "truncated or corrupt"),
    # layer blobs
    ("layer-gzip-truncated", lambda d: oci(d, [tar_bytes([file("f", bytes(range(256)) * 400)])],
                                           blob_bytes=lambda n, b: b[:-200]), "layer 1"),
    ("layer-not-a-tar", lambda d: oci(d, [b"this is not a tar archive at all" * 40]), "layer 1"),
    ("layer-digest-mismatch", lambda d: oci(d, [OK], blob_bytes=lambda n, b: gzip.compress(b"\0" * 1024, mtime=0)),
     "does not match its digest"),
    ("layer-diffid-mismatch", lambda d: oci(d, [OK], diff_ids=lambda ids: ["sha256:" + "1" * 64]),
     "does not match diff_id"),
    ("layer-zstd-corrupt", lambda d: oci(d, [OK], compress=lambda b: b"\x28\xb5\x2f\xfd" + b"\xff" * 64), "layer 1"),
    ("layer-blob-missing", lambda d: oci(d, [OK], blob_bytes=lambda n, b: b, manifest=_with(
        ("layers", 0, "digest"), "sha256:" + "2" * 64)), "missing"),
    ("gzip-bomb", _bomb, "unpacks to more than 16777216 bytes"),
    # index.json
    ("index-not-json", lambda d: oci(d, [OK], index=lambda i: b"{not json"), "index.json: not valid JSON"),
    ("index-not-utf8", lambda d: oci(d, [OK], index=lambda i: b"\xff\xfe{}"), "index.json: not valid JSON"),
    ("index-a-list", lambda d: oci(d, [OK], index=lambda i: [i]), "index.json: expected a JSON object"),
    ("index-manifests-not-list", lambda d: oci(d, [OK], index=_with(("manifests",), {"a": 1})), "lists no manifests"),
    ("index-manifest-a-string", lambda d: oci(d, [OK], index=_with(("manifests",), ["sha256:abc"])),
     "manifests[0]: expected a JSON object"),
    ("index-platform-a-list", lambda d: oci(d, [OK], index=_with(("manifests", 0, "platform"), ["linux"])),
     "platform: expected a JSON object"),
    ("index-digest-a-number", lambda d: oci(d, [OK], index=_with(("manifests", 0, "digest"), 12)), "is not a string"),
    ("index-digest-malformed", lambda d: oci(d, [OK], index=_with(("manifests", 0, "digest"), "sha256:../../x")),
     "malformed digest"),
    ("index-no-amd64", lambda d: oci(d, [OK], index=_with(("manifests", 0, "platform"), {"architecture": "s390x"})),
     "no linux/amd64 manifest"),
    ("index-nested-too-deep", _nested_index, "nested too deeply"),
    ("no-oci-layout-file", lambda d: oci(d, [OK], layout=False), "not an OCI image layout"),
    # manifest
    ("manifest-blob-missing", lambda d: oci(d, [OK], index=_with(("manifests", 0, "digest"), "sha256:" + "3" * 64)),
     "is missing"),
    ("manifest-a-list", lambda d: oci(d, [OK], manifest=lambda m: [m]), "expected a JSON object"),
    ("manifest-mediatype-a-list", lambda d: oci(d, [OK], manifest=_with(("mediaType",), ["x"])), "expected a string"),
    ("manifest-config-a-list", lambda d: oci(d, [OK], manifest=_with(("config",), [1])), "config: expected a JSON object"),
    ("manifest-config-digest-null", lambda d: oci(d, [OK], manifest=_with(("config", "digest"), None)),
     "is not a string"),
    ("manifest-layers-not-list", lambda d: oci(d, [OK], manifest=_with(("layers",), "all")), "no layers list"),
    ("manifest-layer-a-string", lambda d: oci(d, [OK], manifest=_with(("layers", 0), "layer")),
     "layer 1: expected a JSON object"),
    ("manifest-layer-annotations-list", lambda d: oci(d, [OK], manifest=_with(("layers", 0, "annotations"), [1])),
     "annotations: expected a JSON object"),
    ("manifest-layer-count", lambda d: oci(d, [OK], diff_ids=lambda ids: ids * 2), "1 layers but 2 diff_ids"),
    # image config
    ("config-not-json", lambda d: oci(d, [OK], config=lambda c: b"\x00\x01"), "image config: not valid JSON"),
    ("config-a-list", lambda d: oci(d, [OK], config=lambda c: [c]), "image config: expected a JSON object"),
    ("config-rootfs-a-string", lambda d: oci(d, [OK], config=_with(("rootfs",), "layers")),
     "rootfs: expected a JSON object"),
    ("config-no-diff-ids", lambda d: oci(d, [OK], config=_with(("rootfs", "diff_ids"), None)),
     "rootfs.diff_ids is missing"),
    ("config-diff-id-a-number", lambda d: oci(d, [OK], config=_with(("rootfs", "diff_ids"), [7])), "is not a string"),
    ("config-runtime-a-list", lambda d: oci(d, [OK], config=_with(("config",), ["Env"])),
     "config: expected a JSON object"),
    ("config-env-a-string", lambda d: oci(d, [OK], config=_with(("config", "Env"), "PATH=/bin")),
     "Env must be a list of strings"),
    ("config-user-a-number", lambda d: oci(d, [OK], config=_with(("config", "User"), 0)), "config.User: expected a string"),
    ("config-workdir-a-dict", lambda d: oci(d, [OK], config=_with(("config", "WorkingDir"), {})),
     "config.WorkingDir: expected a string"),
    # docker archives
    ("docker-manifest-not-json", lambda d: docker(d, [OK], manifest=lambda m: b"[{oops"), "manifest.json: not valid JSON"),
    ("docker-manifest-an-object", lambda d: docker(d, [OK], manifest=lambda m: m[0]), "expected a list of images"),
    ("docker-two-images", lambda d: docker(d, [OK], manifest=lambda m: m * 2), "holds 2 images"),
    ("docker-config-a-number", lambda d: docker(d, [OK], manifest=lambda m: [{**m[0], "Config": 5}]),
     "Config: expected a string"),
    ("docker-layers-not-list", lambda d: docker(d, [OK], manifest=lambda m: [{**m[0], "Layers": 3}]),
     "Layers is not a list"),
    ("docker-layer-a-number", lambda d: docker(d, [OK], manifest=lambda m: [{**m[0], "Layers": [1]}]),
     "not a file name"),
    ("docker-config-missing", lambda d: docker(d, [OK], omit=(hashlib.sha256(json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [sha(OK)]}}
    ).encode()).hexdigest() + ".json",)), "is missing"),
    ("docker-config-a-list", lambda d: docker(d, [OK], config=lambda c: [c]), "expected a JSON object"),
    # whole archives
    ("not-an-archive", lambda d: (d.mkdir(parents=True), (d / "x.tar").write_bytes(b"\x00garbage" * 300))[0] or d / "x.tar",
     "not a readable image archive"),
    ("archive-of-nothing-known", lambda d: plain_tar(d, {"readme.txt": b"hi"}), "neither an OCI archive"),
]


# -- crafted indexes --------------------------------------------------------------------

CHUNK = 4096
GOOD_CHUNK = Digest.of(b"c" * CHUNK)


def _index(*inodes: dict) -> index_pb2.ImageIndex:
    """Inode 1 is a root directory; `inodes` follow as inode 2, 3, ..."""
    m = index_pb2.ImageIndex(chunk_size=CHUNK)
    m.inodes.add(type=T.DIRECTORY, mode=0o755, nlink=2, size=4096)
    for fields in inodes:
        fields = dict(fields)  # the cases share their dicts
        entries = fields.pop("entries", [])
        extents = fields.pop("extents", [])
        xattrs = fields.pop("xattrs", [])
        node = m.inodes.add(**fields)
        for name, ino in entries:
            node.entries.add(name=name, inode=ino)
        for length, chunk, offset in extents:
            ext = node.extents.add(length=length, chunk_offset=offset)
            if chunk is not None:
                ext.chunk.hash, ext.chunk.size_bytes = chunk
        for k, v in xattrs:
            node.xattrs.add(name=k, value=v)
    return m


def _root(*entries: tuple[bytes, int], **more: dict) -> Callable[[], index_pb2.ImageIndex]:
    def build() -> index_pb2.ImageIndex:
        m = _index(*more.get("inodes", ()))
        for name, ino in entries:
            m.inodes[0].entries.add(name=name, inode=ino)
        return m
    return build


GOOD = (GOOD_CHUNK.hash, GOOD_CHUNK.size)
REG = {"type": T.REGULAR, "mode": 0o644, "size": 1, "extents": [(1, GOOD, 0)]}


def _deep(levels: int, name: bytes = b"d") -> index_pb2.ImageIndex:
    m = _index(*[{"type": T.DIRECTORY, "mode": 0o755, "entries": [(name, i + 3)] if i < levels - 1 else []}
                 for i in range(levels)])
    m.inodes[0].entries.add(name=name, inode=2)
    return m


INDEXES: list[tuple[str, Callable[[], index_pb2.ImageIndex], str]] = [
    ("name-with-slash-escape", _root((b"../../../../tmp/x/pulled-escape", 2), inodes=[REG]), "holds '/' or NUL"),
    ("name-dotdot", _root((b"..", 2), inodes=[REG]), "name b'..' is not allowed"),
    ("name-dot", _root((b".", 2), inodes=[REG]), "name b'.' is not allowed"),
    ("name-empty", _root((b"", 2), inodes=[REG]), "empty name"),
    ("name-nul", _root((b"a\0b", 2), inodes=[REG]), "holds '/' or NUL"),
    ("name-256-bytes", _root((b"n" * 256, 2), inodes=[REG]), "exceeds 255"),
    ("name-4096-bytes", _root((b"n" * 4096, 2), inodes=[REG]), "exceeds 255"),
    ("path-too-long", lambda: _deep(20, b"p" * 250), "exceeds 4096"),
    ("too-deep", lambda: _deep(600), "deeper than 512 directories"),
    ("loop-to-root", _root((b"up", 1)), "directory inode 1 is named twice"),
    ("loop-below", _root((b"a", 2), inodes=[{"type": T.DIRECTORY, "mode": 0o755, "entries": [(b"again", 2)]}]),
     "directory inode 2 is named twice"),
    ("directory-hardlink", _root((b"a", 2), (b"b", 2), inodes=[{"type": T.DIRECTORY, "mode": 0o755}]),
     "is named twice"),
    ("inode-zero", _root((b"a", 0)), "inode 0 out of range"),
    ("inode-past-end", _root((b"a", 99)), "inode 99 out of range"),
    ("name-twice", _root((b"a", 2), (b"a", 2), inodes=[REG]), "name appears twice"),
    ("size-beyond-extents", _root((b"f", 2), inodes=[{**REG, "size": 10 * CHUNK}]), "1 extents for 40960 bytes"),
    ("extent-length-wrong", _root((b"f", 2), inodes=[{**REG, "size": 2, "extents": [(1, GOOD, 0)]}]),
     "extent 0 is 1 bytes long"),
    ("extent-beyond-chunk", _root((b"f", 2), inodes=[{**REG, "size": 100, "extents": [(100, GOOD, CHUNK - 10)]}]),
     "reaches beyond its chunk"),
    ("chunk-hash-traversal", _root((b"f", 2), inodes=[{**REG, "extents": [(1, ("../../etc/shadow", 1), 0)]}]),
     "malformed chunk digest"),
    ("chunk-size-zero", _root((b"f", 2), inodes=[{**REG, "extents": [(1, (GOOD_CHUNK.hash, 0), 0)]}]),
     "malformed chunk digest"),
    ("hole-with-offset", _root((b"f", 2), inodes=[{**REG, "extents": [(1, None, 5)]}]), "hole extent 0 has a chunk offset"),
    ("device-outside-dev", _root((b"sda", 2), inodes=[{"type": T.BLOCK_DEVICE, "mode": 0o600, "rdev_major": 8}]),
     "device node outside /dev"),
    ("symlink-empty", _root((b"l", 2), inodes=[{"type": T.SYMLINK, "mode": 0o777}]), "symlink target must be"),
    ("symlink-nul", _root((b"l", 2), inodes=[{"type": T.SYMLINK, "mode": 0o777, "symlink_target": b"a\0b"}]),
     "symlink target must be"),
    ("xattr-overlay", _root((b"f", 2), inodes=[{**REG, "xattrs": [(b"trusted.overlay.redirect", b"/etc")]}]),
     "would steer overlayfs"),
    ("mode-type-bits", _root((b"f", 2), inodes=[{**REG, "mode": 0o100644}]), "has bits beyond 7777"),
    ("type-unknown", _root((b"f", 2), inodes=[{"type": 99, "mode": 0o644}]), "unknown inode type 99"),
    ("type-unspecified", _root((b"f", 2), inodes=[{"mode": 0o644}]), "unknown inode type 0"),
    ("root-not-directory", lambda: index_pb2.ImageIndex(chunk_size=CHUNK, inodes=[index_pb2.Inode(type=T.REGULAR)]),
     "inode 1 is not the root directory"),
    ("no-inodes", lambda: index_pb2.ImageIndex(chunk_size=CHUNK), "inode 1 is not the root directory"),
    ("chunk-size-zero-index", lambda: index_pb2.ImageIndex(inodes=[index_pb2.Inode(type=T.DIRECTORY)]),
     "chunk size 0"),
    ("size-negative", _root((b"f", 2), inodes=[{**REG, "size": -1, "extents": []}]), "size -1 out of range"),
    ("file-with-entries", _root((b"f", 2), inodes=[{**REG, "entries": [(b"x", 1)]}]), "not a directory but has entries"),
    ("dir-with-extents", _root((b"d", 2), inodes=[{"type": T.DIRECTORY, "mode": 0o755, "extents": [(1, GOOD, 0)]}]),
     "not a regular file but has extents"),
]
