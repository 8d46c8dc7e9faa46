"""Read a source image: an OCI image layout directory, an OCI archive, or a `docker save` archive.

Every blob is checked against its digest as it is read; a missing or
mismatching blob is refused with BadImage naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import platform as platform_module
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import zstandard

from imagestream import config as settings
from imagestream.digests import HashingStream
from imagestream.errors import BadImage
from imagestream.oci import IMAGE_INDEX_TYPES



@dataclasses.dataclass
class Layer:
    """One layer: where its blob is, and the digests it must match."""

    position: int  # 1-based, bottom layer first
    blob_name: str  # path inside the source, for messages
    digest: str | None  # digest of the blob as stored (None for docker archives: they list none)
    diff_id: str | None  # digest of the uncompressed tar, from the image config

    def describe(self) -> str:
        return f"layer {self.position} ({self.digest or self.blob_name})"


RATIO_FROM_BYTES = 1 << 30  # small layers may compress as well as they like


class _BoundedStream(HashingStream):
    """A HashingStream that calls `check(bytes so far)` after every read: it raises to stop a stream
    that grows too much (a decompression bomb)."""

    def __init__(self, inner: IO[bytes], check: Callable[[int], None]) -> None:
        super().__init__(inner)
        self.check = check

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = super().readinto(b)
        self.check(self.size)
        return n


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """gzip, zstd or plain tar, told apart by their magic numbers."""
    buffered = io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[return-value]
    return buffered


class ImageSource:
    """A source image, whatever its format. Use `open_image(path)`."""

    format = "?"

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.manifest_digest = ""
        self.manifest: dict[str, Any] | None = None  # the OCI manifest, for formats that have one
        self.config_bytes = b""
        self.config: dict[str, Any] = {}
        self.layers: list[Layer] = []
        self.unpacked_bytes = 0  # of the layers read so far, uncompressed
        self.blob_sizes: dict[str, int] = {}  # descriptor sizes, for sources that download blobs
        self.download_bytes = 0  # what a registry source downloads (config and layers); 0 for local files
        self.on_bytes: Callable[[int], None] = lambda n: None  # called as blob bytes are downloaded

    # -- per format ------------------------------------------------------
    def _open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def _exists(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared ----------------------------------------------------------
    def _read_blob(self, name: str, digest: str | None, what: str, limit: int = 16 << 20) -> bytes:
        if not self._exists(name):
            raise BadImage(f"{what}: blob {digest or name} is missing from {self.path}")
        with self._open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BadImage(f"{what}: blob {digest or name} is larger than {limit} bytes")
        if digest is not None:
            _check_digest_form(digest, what)
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise BadImage(f"{what}: blob {digest} does not match its digest (content is {actual})")
        return data

    def _json(self, data: bytes, what: str) -> dict[str, Any]:
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadImage(f"{what}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise BadImage(f"{what}: expected a JSON object")
        return value

    def _set_config(self, data: bytes, what: str) -> None:
        self.config_bytes = data  # kept as received, for the regional OCI endpoint (chunk_store.distribution)
        self.config = self._json(data, what)
        diff_ids = _obj(self.config.get("rootfs") or {}, f"{what}: rootfs").get("diff_ids")
        if not isinstance(diff_ids, list):
            raise BadImage(f"{what}: rootfs.diff_ids is missing")
        runtime = _obj(self.config.get("config") or {}, f"{what}: config")
        # what `run` reads of it, so that a run never meets a wrong type
        for key in ("User", "WorkingDir"):
            _opt_str(runtime.get(key), f"{what}: config.{key}")
        env = runtime.get("Env") or []
        if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
            raise BadImage(f"{what}: config.Env must be a list of strings")
        self._diff_ids = diff_ids

    @contextlib.contextmanager
    def open_layer(self, layer: Layer) -> Iterator[tarfile.TarFile]:
        """The layer as a streaming tar; both digests are checked once it has been read to the end.

        Callers must read every member; `verify_layer` is called on normal exit.
        """
        if not self._exists(layer.blob_name):
            raise BadImage(f"{layer.describe()}: blob is missing from {self.path}")
        limit = settings.parse_size(settings.get("max_unpacked_bytes"))
        ratio = float(settings.get("max_unpack_ratio"))
        before = self.unpacked_bytes

        def bounded(count: int) -> None:  # a decompression bomb stops here, not when the disk is full
            self.unpacked_bytes = before + count
            if limit and self.unpacked_bytes > limit:
                raise BadImage(f"{layer.describe()}: the image unpacks to more than {limit} bytes "
                               f"(IMAGESTREAM_MAX_UNPACKED_BYTES)")
            if ratio and count > RATIO_FROM_BYTES and count > ratio * max(raw.size, 1):
                raise BadImage(f"{layer.describe()}: expands more than {ratio:g} times "
                               f"({raw.size} bytes into {count}; IMAGESTREAM_MAX_UNPACK_RATIO)")

        with self._open(layer.blob_name) as raw_file:
            raw = HashingStream(raw_file)
            try:
                unpacked = _BoundedStream(_decompressed(raw), bounded)
                tar = tarfile.open(fileobj=unpacked, mode="r|", errorlevel=2)  # type: ignore[call-overload]
            except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as e:
                raise BadImage(f"{layer.describe()}: not a readable tar ({e})") from None
            try:
                yield tar
                unpacked.drain()
                raw.drain()
            except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as e:
                raise BadImage(f"{layer.describe()}: truncated or corrupt ({type(e).__name__}: {e})") from None
            if layer.digest is not None and raw.oci_digest() != layer.digest:
                raise BadImage(f"{layer.describe()}: blob does not match its digest (content is {raw.oci_digest()})")
            if layer.diff_id is not None and unpacked.oci_digest() != layer.diff_id:
                raise BadImage(
                    f"{layer.describe()}: uncompressed tar does not match diff_id {layer.diff_id} "
                    f"(content is {unpacked.oci_digest()})"
                )


def _obj(value: Any, what: str) -> dict[str, Any]:
    """`value` if it is a JSON object, else BadImage: hostile JSON puts lists and numbers anywhere."""
    if not isinstance(value, dict):
        raise BadImage(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _opt_str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadImage(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _size(value: Any, what: str) -> int | None:
    """A descriptor's size (None if it names none: local layouts are read whole anyway)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 50:
        raise BadImage(f"{what}: size {value!r} is not a byte count")
    return value


def _check_digest_form(digest: Any, what: str) -> None:
    if not isinstance(digest, str):
        raise BadImage(f"{what}: digest {digest!r} is not a string")
    algo, _, hex_ = digest.partition(":")
    if algo != "sha256" or len(hex_) != 64 or any(c not in "0123456789abcdef" for c in hex_):
        raise BadImage(f"{what}: unsupported or malformed digest {digest!r}")




_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
         "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def node_platform() -> str:
    """This node's platform as an image index names it: 'linux/amd64', 'linux/arm64', ..."""
    machine = platform_module.machine().lower()
    return f"linux/{_ARCH.get(machine, machine)}"


def parse_platform(text: str) -> tuple[str, str, str]:
    """'linux/arm64/v8' -> ('linux', 'arm64', 'v8'); BadImage if it is not OS/ARCH[/VARIANT]."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_.-]{1,32}", p) for p in parts):
        raise BadImage(f"platform {text!r}: want OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _pick_manifest(image_index: dict[str, Any], what: str, wanted: str) -> dict[str, Any]:
    """The descriptor of the manifest for platform `wanted` (OS/ARCH[/VARIANT]) in an image index."""
    manifests = image_index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise BadImage(f"{what}: lists no manifests")
    want_os, want_arch, want_variant = parse_platform(wanted)
    listed = []
    for i, m in enumerate(manifests):
        m = _obj(m, f"{what}: manifests[{i}]")
        platform = _obj(m.get("platform") or {}, f"{what}: manifests[{i}].platform")
        if not platform and len(manifests) == 1:
            return m  # a single manifest that names no platform: the image has one
        os_, arch = _opt_str(platform.get("os"), f"{what}: os"), _opt_str(platform.get("architecture"), f"{what}: arch")
        variant = _opt_str(platform.get("variant"), f"{what}: variant")
        if os_ == want_os and arch == want_arch and (not want_variant or variant == want_variant):
            return m
        listed.append("/".join(p for p in (os_ or "?", arch or "?", variant) if p))
    raise BadImage(f"{what}: no {wanted} manifest (the index has {', '.join(listed)}; choose one with --platform)")


class _OciSource(ImageSource):
    """OCI image layout: oci-layout, index.json, blobs/<algo>/<hex>."""

    platform = ""  # OS/ARCH[/VARIANT] picked from an image index

    def _load(self) -> None:
        if not self._exists("oci-layout"):
            raise BadImage(f"{self.path}: no oci-layout file, not an OCI image layout")
        descriptor = _pick_manifest(self._json(self._read_blob("index.json", None, "index.json"), "index.json"),
                                    "index.json", self.platform)
        digest = descriptor.get("digest", "")
        _check_digest_form(digest, "index.json")
        self._follow(digest, self._json(self._read_manifest(digest), f"manifest {digest}"))

    def _record_size(self, digest: str, value: Any, what: str) -> None:
        size = _size(value, what)
        if size is not None:
            self.blob_sizes[digest] = size

    def _read_manifest(self, digest: str) -> bytes:
        """A manifest or image index by digest, checked against it."""
        return self._read_blob(self._blob(digest), digest, f"manifest {digest}")

    def _follow(self, digest: str, doc: dict[str, Any]) -> None:
        """From a manifest or image index down to the image manifest of this platform, then load it."""
        for _ in range(4):  # an image index may point to another image index (multi-platform images)
            if _opt_str(doc.get("mediaType"), f"manifest {digest}: mediaType") in IMAGE_INDEX_TYPES or "manifests" in doc:
                descriptor = _pick_manifest(doc, f"image index {digest}", self.platform)
                digest = descriptor.get("digest", "")
                _check_digest_form(digest, f"image index {digest}")
                doc = self._json(self._read_manifest(digest), f"manifest {digest}")
                continue
            break
        else:
            raise BadImage(f"{self.path}: image indexes nested too deeply")
        self.manifest_digest = digest
        self.manifest = doc
        config = _obj(doc.get("config") or {}, f"manifest {digest}: config")
        _opt_str(config.get("mediaType"), f"manifest {digest}: config mediaType")
        _obj(doc.get("annotations") or {}, f"manifest {digest}: annotations")
        config_digest = config.get("digest", "")
        _check_digest_form(config_digest, f"manifest {digest} config")
        self._record_size(config_digest, config.get("size"), f"manifest {digest} config")
        self._set_config(self._read_blob(self._blob(config_digest), config_digest, "image config"), "image config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise BadImage(f"manifest {digest}: no layers list")
        if len(layers) != len(self._diff_ids):
            raise BadImage(f"manifest {digest}: {len(layers)} layers but {len(self._diff_ids)} diff_ids in the config")
        for i, (layer, diff_id) in enumerate(zip(layers, self._diff_ids), 1):
            layer = _obj(layer, f"manifest {digest}: layer {i}")
            _opt_str(layer.get("mediaType"), f"manifest {digest}: layer {i} mediaType")
            _obj(layer.get("annotations") or {}, f"manifest {digest}: layer {i} annotations")
            layer_digest = layer.get("digest", "")
            _check_digest_form(layer_digest, f"layer {i}")
            _check_digest_form(diff_id, f"layer {i} diff_id")
            self._record_size(layer_digest, layer.get("size"), f"manifest {digest}: layer {i}")
            self.layers.append(Layer(i, self._blob(layer_digest), layer_digest, diff_id))

    @staticmethod
    def _blob(digest: str) -> str:
        algo, _, hex_ = digest.partition(":")
        return f"blobs/{algo}/{hex_}"


class OciLayoutDir(_OciSource):
    format = "oci-layout"

    def __init__(self, path: pathlib.Path, platform: str) -> None:
        super().__init__(path)
        self.platform = platform
        self._load()

    def _exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def _open(self, name: str) -> IO[bytes]:
        return open(self.path / name, "rb")


class _TarMembers:
    """Random access to the members of a tar file (OCI and docker archives are uncompressed tars)."""

    def __init__(self, path: pathlib.Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadImage(f"{path}: not a readable image archive ({' '.join(str(e).split())})") from None

    def exists(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> IO[bytes]:
        f = self.tar.extractfile(self.members[name])
        assert f is not None
        return f


class _InArchive(ImageSource):
    """An image whose files are the members of one tar archive."""

    def __init__(self, path: pathlib.Path, members: _TarMembers) -> None:
        super().__init__(path)
        self._members = members

    def _exists(self, name: str) -> bool:
        return self._members.exists(name)

    def _open(self, name: str) -> IO[bytes]:
        return self._members.open(name)

    def close(self) -> None:
        self._members.tar.close()


class OciArchive(_InArchive, _OciSource):
    format = "oci-archive"

    def __init__(self, path: pathlib.Path, members: _TarMembers, platform: str) -> None:
        super().__init__(path, members)
        self.platform = platform
        self._load()


class DockerArchive(_InArchive):
    """`docker save` output: manifest.json naming a config and layer tars."""

    format = "docker-archive"

    def __init__(self, path: pathlib.Path, members: _TarMembers) -> None:
        super().__init__(path, members)
        try:
            entries = json.loads(self._read_blob("manifest.json", None, "manifest.json"))
        except ValueError as e:  # UnicodeDecodeError is a ValueError
            raise BadImage(f"manifest.json: not valid JSON ({e})") from None
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise BadImage("manifest.json: expected a list of images")
        if len(entries) > 1:
            raise BadImage(f"manifest.json: holds {len(entries)} images; save one image per archive")
        entry = entries[0]
        config_name = _opt_str(entry.get("Config"), "manifest.json: Config")
        # the config is stored under its own digest (<hex>.json or blobs/sha256/<hex>)
        stem = pathlib.PurePosixPath(config_name).name.removesuffix(".json")
        config_digest = f"sha256:{stem}" if len(stem) == 64 else None
        config_bytes = self._read_blob(config_name, config_digest, "image config")
        self._set_config(config_bytes, "image config")
        self.manifest_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        layers = entry.get("Layers")
        if not isinstance(layers, list):
            raise BadImage("manifest.json: Layers is not a list")
        if len(layers) != len(self._diff_ids):
            raise BadImage(f"manifest.json: {len(layers)} layers but {len(self._diff_ids)} diff_ids in the config")
        for i, (name, diff_id) in enumerate(zip(layers, self._diff_ids), 1):
            if not isinstance(name, str):
                raise BadImage(f"manifest.json: layer {i} is {name!r}, not a file name")
            _check_digest_form(diff_id, f"layer {i} diff_id")
            # the blob name is a digest in Docker 25+ archives; older ones name it <id>/layer.tar
            self.layers.append(Layer(i, name, None, diff_id))


class _SpoolingBlob(io.RawIOBase):
    """A blob read off the registry: hashed as it streams, and written to the spool as it is read, so
    that push reads it once. The spooled file gets its final name only once every byte has been read
    and matched the digest; a blob cut short or not matching leaves nothing behind."""

    def __init__(self, body: IO[bytes], digest: str, final: pathlib.Path, on_bytes: Callable[[int], None]) -> None:
        self.body = HashingStream(body)
        self.digest = digest
        self.final = final
        self.part = final.with_name(final.name + ".part")
        self.file = open(self.part, "wb")
        self.on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = self.body.readinto(b)
        if n:
            self.file.write(memoryview(b)[:n])
            self.on_bytes(n)
        elif not self.file.closed:
            self.file.close()
            if self.body.oci_digest() != self.digest:
                raise BadImage(f"blob {self.digest} from the registry does not match its digest "
                               f"(content is {self.body.oci_digest()})")
            os.replace(self.part, self.final)
        return n

    def close(self) -> None:
        if not self.closed:
            if not self.file.closed:
                self.file.close()
            self.part.unlink(missing_ok=True)
            self.body.inner.close()
        super().close()


class RegistrySource(_OciSource):
    """An image in a registry (OCI Distribution API): the manifest of this platform, its config and layers,
    each blob streamed once, checked against its digest as it streams, and kept in the push's spool."""

    format = "registry"

    def __init__(self, reference: str, spool: pathlib.Path, platform: str, ca_file: str | None,
                 plain_http: bool, **access: Any) -> None:
        from imagestream.ingest.registry import RegistryClient, parse_reference

        self.ref = parse_reference(reference)
        super().__init__(pathlib.Path(str(self.ref)))
        self.platform = platform
        self.spool = spool
        self.spool.mkdir(parents=True, exist_ok=True)
        self.client = RegistryClient(self.ref, ca_file=ca_file, plain_http=plain_http, **access)
        try:
            top = self.client.manifest(self.ref.reference)
            self._follow(top.digest, top.json())
        except BaseException:
            self.client.close()
            raise
        self.download_bytes = sum(self.blob_sizes.values())

    def _read_manifest(self, digest: str) -> bytes:
        return self.client.manifest(digest).content

    def _local(self, name: str) -> pathlib.Path:
        return self.spool / name.rsplit("/", 1)[-1]

    def _exists(self, name: str) -> bool:
        return name.startswith("blobs/sha256/")

    def _open(self, name: str) -> IO[bytes]:
        local = self._local(name)
        if local.exists():
            return open(local, "rb")
        digest = "sha256:" + name.rsplit("/", 1)[-1]
        if digest not in self.blob_sizes:
            raise BadImage(f"{self.path}: the descriptor of blob {digest} gives no size")
        body = self.client.open_blob(digest, self.blob_sizes[digest])
        # buffered: read(n) then returns n bytes unless the blob ends, as a local file's would
        return io.BufferedReader(_SpoolingBlob(body, digest, local, self.on_bytes), 1 << 20)

    def close(self) -> None:
        self.client.close()


def open_image(path: str | pathlib.Path, platform: str | None = None, spool: pathlib.Path | None = None,
               ca_file: str | None = None, plain_http: bool = False, **access: Any) -> ImageSource:
    """Open SOURCE as an OCI layout, OCI archive, docker archive, or a registry reference (HOST/REPO:TAG);
    BadImage (or RegistryError) says why not. `platform` (OS/ARCH[/VARIANT], default this node's) picks the
    manifest of an image index; a registry source spools its blobs under `spool`. `access`: the
    RegistryClient's `login` and `ca_pem` (a mirror's, chunk_store/mirror.py)."""
    platform = platform or node_platform()
    parse_platform(platform)
    from imagestream.ingest.registry import looks_like_reference

    local = pathlib.Path(path)
    if not local.exists() and looks_like_reference(str(path)):
        if spool is None:
            raise BadImage(f"{path}: a registry source needs a spool folder")
        return RegistrySource(str(path), spool, platform, ca_file, plain_http, **access)
    if local.is_dir():
        return OciLayoutDir(local, platform)
    if not local.exists():
        raise BadImage(f"{local}: no such file or directory (nor a registry reference HOST[:PORT]/REPOSITORY[:TAG])")
    members = _TarMembers(local)
    if members.exists("oci-layout"):
        return OciArchive(local, members, platform)
    if members.exists("manifest.json"):
        return DockerArchive(local, members)
    members.tar.close()
    raise BadImage(f"{local}: neither an OCI archive (no oci-layout) nor a docker archive (no manifest.json)")
