"""Build real container images from Debian (debootstrap) without a container engine.

The images are written in the three forms `imagestream push` accepts: an OCI image
layout directory, an OCI archive (what `skopeo copy oci-archive:` makes) and a
classic `docker save` archive. Every writer is deterministic: the same input tree
gives byte-identical output, so digests are stable across runs and machines.

    python -m imagestream_dev.imagebuild debian-python --cache-dir .cache --out .cache/images
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from imagestream.digests import HashingStream
from imagestream.oci import MEDIA_LAYER, MEDIA_OCI_CONFIG, MEDIA_OCI_IMAGE_INDEX, MEDIA_OCI_MANIFEST

Compression = Literal["gzip", "zstd", "none"]
PathFilter = Callable[[str], bool]  # gets a tree-relative posix path ("usr/bin/python3")

DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "IMAGESTREAM_DEBIAN_MIRROR"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Generated filler files get this mtime (2024-01-01T00:00:00Z) so a seed fully
# determines the image; real rootfs files keep their own mtimes.
FILLER_MTIME = 1704067200

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- rootfs


def default_mirror(suite: str = "bookworm") -> str:
    """The Debian mirror to use: $IMAGESTREAM_DEBIAN_MIRROR, else the host's apt source for suite."""
    if env := os.environ.get(MIRROR_ENV):
        return env
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for f in files:  # one-line style: "deb [opts] URI SUITE COMPONENTS"
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == suite:
                return m.group(1)
    for f in sorted((apt / "sources.list.d").glob("*.sources")):  # deb822 style
        for stanza in re.split(r"\n\s*\n", f.read_text(errors="replace")):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (ln.partition(":") for ln in stanza.splitlines() if ln and not ln.startswith("#"))
            )
            if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                return fields.get("uris", DEFAULT_MIRROR).split()[0]
    return DEFAULT_MIRROR


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (a killed debootstrap can leave proc/sys mounted)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].encode().decode("unicode_escape")
        if mnt == prefix or mnt.startswith(prefix + "/"):
            found.append(mnt)
    return found


def _remove_tree(path: Path) -> None:
    # Never rmtree through a live mount: that would delete the host's /proc or /sys files.
    if mounts := _mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: still mounted {mounts}; umount them first")
    shutil.rmtree(path, ignore_errors=False)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # serialise builders of the same key (parallel tests)
        yield


def build_rootfs(
    cache_dir: Path,
    *,
    suite: str = "bookworm",
    packages: Sequence[str] = ("python3",),
    variant: str = "minbase",
    mirror: str | None = None,
) -> Path:
    """Debootstrap a Debian rootfs once; later calls with the same key return the cached tree.

    The tree is built in a temp dir and renamed into place only on success, so the
    final path existing means the build completed.
    """
    cache_dir = Path(cache_dir)
    pkgs = sorted(set(packages))
    key_hash = hashlib.sha256("\0".join([suite, variant, *pkgs]).encode()).hexdigest()[:12]
    final = cache_dir / f"{suite}-{variant}-{key_hash}"
    if final.is_dir():
        return final
    with _locked(cache_dir / f".{final.name}.lock"):
        if final.is_dir():
            return final
        for stale in cache_dir.glob(f".tmp-{final.name}-*"):  # left by a killed run
            _remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        cmd = ["debootstrap", f"--variant={variant}"]
        if pkgs:
            cmd.append("--include=" + ",".join(pkgs))
        cmd += [suite, str(tmp), mirror or default_mirror(suite)]
        try:
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=sys.stderr)  # stdout carries only the result path
            _shrink(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it 0700; the image root must be 0755
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_tree(tmp)
            raise
    return final


def _shrink(root: Path) -> None:
    """Drop apt's downloaded .debs and package lists: nothing in the image needs them."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in root.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
    # debootstrap copies the build host's identity in; an image should not carry it.
    for name in ("etc/hostname", "etc/resolv.conf"):
        p = root / name
        if p.is_file() and not p.is_symlink():
            p.write_text("")


def add_filler(rootfs: Path, dest: Path, megabytes: int, seed: int) -> Path:
    """A copy of rootfs (hardlinked, so cheap) plus /opt/filler holding `megabytes` MiB of random data.

    The data is incompressible and fully determined by seed: a "large" image whose
    extra bytes a command never reads. Built in a temp dir and renamed on success.
    """
    rootfs, dest = Path(rootfs), Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    tmp = dest.with_name(f".filler-tmp-{dest.name}-{os.getpid()}")
    if tmp.exists():
        _remove_tree(tmp)
    # Hardlinks share inodes with the base; we only add new files, never modify existing ones.
    subprocess.run(["cp", "-al", str(rootfs), str(tmp)], check=True)
    opt = tmp / "opt"
    if not opt.is_dir():
        opt.mkdir(mode=0o755)
        os.utime(opt, (FILLER_MTIME, FILLER_MTIME))
    opt_times = opt.stat()
    filler = opt / "filler"
    filler.mkdir(mode=0o755)
    rng = random.Random(seed)
    for rel, size in filler_plan(megabytes, seed):
        p = filler / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, _CHUNK)
                f.write(rng.randbytes(n))
                left -= n
        os.chmod(p, 0o644)
        os.utime(p, (FILLER_MTIME, FILLER_MTIME))
    for d in [filler, *(x for x in filler.rglob("*") if x.is_dir())]:
        os.chmod(d, 0o755)  # independent of the caller's umask
        os.utime(d, (FILLER_MTIME, FILLER_MTIME))
    os.utime(opt, ns=(opt_times.st_atime_ns, opt_times.st_mtime_ns))
    os.rename(tmp, dest)
    return dest


def filler_plan(megabytes: int, seed: int) -> list[tuple[str, int]]:
    """(relative path, size) of the filler files: ~10% of bytes in many small files,
    ~30% in medium ones, ~60% in a few large ones; sums to exactly megabytes MiB."""
    total = megabytes << 20
    rng = random.Random(seed ^ 0x5EED)
    classes = [("small", 0.10, 512, 16 << 10), ("medium", 0.30, 64 << 10, 1 << 20), ("large", 0.60, 4 << 20, 32 << 20)]
    plan: list[tuple[str, int]] = []
    used = 0
    for i, (name, share, lo, hi) in enumerate(classes):
        budget = total - used if i == len(classes) - 1 else int(total * share)
        n = 0
        while budget > 0:
            size = min(budget, rng.randint(lo, hi))
            plan.append((f"{name}/{n // 256:03d}/{n % 256:03d}.bin", size))
            budget -= size
            used += size
            n += 1
    return plan


# --------------------------------------------------------------------------- layer tars


@dataclasses.dataclass(frozen=True)
class Layer:
    path: Path  # the blob as written (compressed per media_type)
    media_type: str
    digest: str  # sha256:... of the blob
    size: int  # bytes of the blob
    diff_id: str  # sha256:... of the uncompressed tar


@contextlib.contextmanager
def _compressed_writer(out: BinaryIO, compression: Compression) -> Iterator[BinaryIO]:
    """Deterministic compressor stream: gzip with mtime=0 and no file name; zstd single-threaded."""
    if compression == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
            yield gz  # type: ignore[misc]
    elif compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        with cctx.stream_writer(out, closefd=False) as zw:
            yield zw  # type: ignore[misc]
    elif compression == "none":
        yield out
    else:
        raise ValueError(f"unknown compression {compression!r}")


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every entry below root: pre-order, names sorted bytewise."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: os.fsencode(e.name))
    for e in entries:
        r = f"{rel}{e.name}"
        yield r, Path(e.path)
        if e.is_dir(follow_symlinks=False):
            yield from _walk(Path(e.path), r + "/")


def _xattrs(p: Path) -> dict[str, str]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        with contextlib.suppress(OSError):
            value = os.getxattr(p, name, follow_symlinks=False)
            # surrogateescape round-trips binary values (e.g. security.capability) via hdrcharset=BINARY
            out[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return out


def _tarinfo(rel: str, p: Path, st: os.stat_result) -> tarfile.TarInfo | None:
    ti = tarfile.TarInfo(rel)
    ti.mode = stat.S_IMODE(st.st_mode)  # keeps setuid/setgid/sticky
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""  # names depend on the build host's /etc/passwd
    ti.mtime = int(st.st_mtime)
    m = st.st_mode
    if stat.S_ISREG(m):
        ti.type, ti.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(m):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(m):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(p)
    elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(m) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(m):
        ti.type = tarfile.FIFOTYPE
    else:
        return None  # sockets cannot live in a tar
    ti.pax_headers = _xattrs(p)
    return ti


def _selected(root: Path, paths: PathFilter | None) -> list[str]:
    """Relative paths to put in a layer: those the filter accepts plus their parent dirs."""
    rels = [rel for rel, _ in _walk(root)]
    if paths is None:
        return rels
    keep = {r for r in rels if paths(r)}
    for r in list(keep):
        parts = r.split("/")
        keep.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return [r for r in rels if r in keep]


def _write_tar(root: Path, rels: Sequence[str], out: BinaryIO) -> None:
    seen: dict[tuple[int, int], str] = {}  # inode -> first path, for hardlinks
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for rel in rels:
            p = root / rel
            st = p.lstat()
            ti = _tarinfo(rel, p, st)
            if ti is None:
                continue
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, seen[key], 0
                else:
                    seen[key] = rel
            if ti.type == tarfile.REGTYPE:
                with open(p, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)


def write_layer(
    rootfs: Path,
    out_tar: Path,
    *,
    compression: Compression = "gzip",
    paths: PathFilter | None = None,
) -> Layer:
    """Write an OCI layer tar of rootfs (or of the entries `paths` accepts, plus their parents).

    Entries are relative ("usr/bin/x", dirs end in "/"), sorted, PAX format, numeric
    ids only, real mtimes in whole seconds, xattrs as SCHILY.xattr.* records.
    """
    rootfs, out_tar = Path(rootfs), Path(out_tar)
    rels = _selected(rootfs, paths)
    with open(out_tar, "wb") as raw:
        blob = HashingStream(raw)
        with _compressed_writer(blob, compression) as cw:  # type: ignore[arg-type]
            plain = HashingStream(cw)
            _write_tar(rootfs, rels, plain)  # type: ignore[arg-type]
    return Layer(
        path=out_tar,
        media_type=MEDIA_LAYER[compression],
        digest=blob.oci_digest(),
        size=blob.size,
        diff_id=plain.oci_digest(),
    )


# --------------------------------------------------------------------------- OCI layout


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    env: tuple[str, ...] = (DEFAULT_PATH_ENV,)
    cmd: tuple[str, ...] = ("python3",)
    architecture: str = "amd64"
    os: str = "linux"

    def to_json(self, diff_ids: Sequence[str]) -> bytes:
        # No "created"/"history": optional, and a timestamp would break determinism.
        return _canonical(
            {
                "architecture": self.architecture,
                "os": self.os,
                "config": {"Env": list(self.env), "Cmd": list(self.cmd)},
                "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            }
        )


@dataclasses.dataclass(frozen=True)
class OciImage:
    layout_dir: Path
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = _sha(data)
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def _prepare_layout(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    blobs = out_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    return blobs


def _finish_layout(out_dir: Path, layers: Sequence[Layer], config: ImageConfig, ref_name: str) -> OciImage:
    out_dir = Path(out_dir)
    blobs = out_dir / "blobs" / "sha256"
    cfg_digest, cfg_size = _put_blob(blobs, config.to_json([l.diff_id for l in layers]))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size} for l in layers],
    }
    man_digest, man_size = _put_blob(blobs, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_IMAGE_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_OCI_MANIFEST,
                "digest": man_digest,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": ref_name},
            }
        ],
    }
    (out_dir / "index.json").write_bytes(_canonical(index))
    (out_dir / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    return OciImage(out_dir, man_digest, cfg_digest, tuple(layers))


def _store_layer_blob(blobs: Path, tmp: Path, layer: Layer) -> Layer:
    final = blobs / layer.digest.split(":", 1)[1]
    os.replace(tmp, final)
    return dataclasses.replace(layer, path=final)


def write_oci_layout(
    rootfs: Path,
    out_dir: Path,
    *,
    layers: Sequence[PathFilter] = (),
    compression: Compression = "gzip",
    config: ImageConfig = ImageConfig(),
    ref_name: str = "latest",
) -> OciImage:
    """Write rootfs as an OCI image layout in out_dir (must be empty or absent).

    `layers` splits the tree: each entry goes to the first layer whose filter
    accepts it, and one last layer takes whatever no filter accepted (parents of
    an entry are repeated in its layer, as usual).
    """
    blobs = _prepare_layout(out_dir)
    filters: list[PathFilter | None] = []
    for i, f in enumerate(layers):
        earlier = list(layers[:i])
        filters.append(lambda r, f=f, earlier=earlier: f(r) and not any(e(r) for e in earlier))
    if layers:
        filters.append(lambda r: not any(f(r) for f in layers))
    else:
        filters.append(None)
    written = []
    for i, flt in enumerate(filters):
        tmp = blobs / f".layer-{i}.tmp"
        written.append(_store_layer_blob(blobs, tmp, write_layer(rootfs, tmp, compression=compression, paths=flt)))
    return _finish_layout(out_dir, written, config, ref_name)


def write_oci_layout_from_layers(
    layer_tars: Sequence[Path],
    out_dir: Path,
    *,
    compression: Compression = "gzip",
    config: ImageConfig = ImageConfig(),
    ref_name: str = "latest",
) -> OciImage:
    """Write an OCI image layout from ready-made UNCOMPRESSED layer tars (e.g. hand-made with whiteouts)."""
    blobs = _prepare_layout(out_dir)
    written = []
    for i, src in enumerate(layer_tars):
        tmp = blobs / f".layer-{i}.tmp"
        with open(src, "rb") as fin, open(tmp, "wb") as raw:
            blob = HashingStream(raw)
            with _compressed_writer(blob, compression) as cw:  # type: ignore[arg-type]
                plain = HashingStream(cw)
                while chunk := fin.read(_CHUNK):
                    plain.write(chunk)
        layer = Layer(tmp, MEDIA_LAYER[compression], blob.oci_digest(), blob.size, plain.oci_digest())
        written.append(_store_layer_blob(blobs, tmp, layer))
    return _finish_layout(out_dir, written, config, ref_name)


# --------------------------------------------------------------------------- archives


def _archive_info(name: str, *, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    # Wrapper entries are packaging, not image content: fixed mtime/owner keep archives reproducible.
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.mode = 0o755 if is_dir else 0o644
    ti.size = size
    ti.mtime = 0
    ti.uname = ti.gname = ""
    return ti


def write_oci_archive(layout_dir: Path, out_tar: Path) -> Path:
    """Tar up an OCI layout directory (entries relative to it, like `skopeo copy oci-archive:`)."""
    layout_dir, out_tar = Path(layout_dir), Path(out_tar)
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, p in _walk(layout_dir):
            if p.is_dir():
                tar.addfile(_archive_info(rel, is_dir=True))
            else:
                with open(p, "rb") as f:
                    tar.addfile(_archive_info(rel, size=p.stat().st_size), f)
    return out_tar


def write_docker_archive(
    layer_tars: Sequence[Path],
    out_tar: Path,
    repo_tag: str,
    *,
    config: ImageConfig = ImageConfig(),
) -> Path:
    """Classic `docker save` archive: manifest.json, <config>.json, <diff_id>/layer.tar (uncompressed).

    Every docker version (and skopeo's docker-archive:) reads this layout.
    """
    out_tar = Path(out_tar)
    diff_ids = []
    for p in layer_tars:
        with open(p, "rb") as f:
            diff_ids.append("sha256:" + hashlib.file_digest(f, "sha256").hexdigest())
    cfg = config.to_json(diff_ids)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    layer_names = [d.split(":", 1)[1] + "/layer.tar" for d in diff_ids]
    manifest = _canonical([{"Config": cfg_name, "RepoTags": [repo_tag], "Layers": layer_names}])
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        done: set[str] = set()
        for name, src in zip(layer_names, layer_tars):
            if name in done:  # identical layers (e.g. two empty ones) are stored once
                continue
            done.add(name)
            tar.addfile(_archive_info(name.split("/")[0], is_dir=True))
            tar.addfile(_archive_info(name.split("/")[0] + "/VERSION", size=3), io.BytesIO(b"1.0"))
            with open(src, "rb") as f:
                tar.addfile(_archive_info(name, size=Path(src).stat().st_size), f)
        tar.addfile(_archive_info(cfg_name, size=len(cfg)), io.BytesIO(cfg))
        tar.addfile(_archive_info("manifest.json", size=len(manifest)), io.BytesIO(manifest))
    return out_tar


# --------------------------------------------------------------------------- CLI


def build_debian_python(
    cache_dir: Path, out: Path, *, fmt: str = "oci", filler_mb: int = 0, seed: int = 0, mirror: str | None = None
) -> Path:
    """Build (or reuse) the debian-python image in the requested format; returns its path."""
    cache_dir, out = Path(cache_dir).resolve(), Path(out).resolve()
    rootfs = build_rootfs(cache_dir / "rootfs", mirror=mirror)
    name = "debian-python"
    if filler_mb:
        name += f"-filler{filler_mb}m-s{seed}"
        derived = cache_dir / "rootfs" / f"{rootfs.name}-filler{filler_mb}m-s{seed}"
        if not derived.is_dir():
            add_filler(rootfs, derived, filler_mb, seed)
        rootfs = derived
    return _write_image(rootfs, out, name, fmt)


# A real large image: about 1 GB of installed Debian packages (a JDK and Python's scientific
# stack), of which a start reads a real part (LARGE_COMMAND imports numpy, scipy and pandas).
LARGE_PACKAGES = ("python3", "python3-numpy", "python3-scipy", "python3-pandas", "python3-matplotlib",
                  "python3-sklearn", "openjdk-17-jdk-headless")
LARGE_COMMAND = ("python3", "-c", "import numpy, scipy.linalg, pandas; "
                 "print(int(scipy.linalg.det(numpy.eye(3))), len(pandas.DataFrame({'a': [1, 2]})))")


def build_debian_large(cache_dir: Path, out: Path, *, fmt: str = "oci", mirror: str | None = None) -> Path:
    """Build (or reuse) the debian-large image (LARGE_PACKAGES) in the requested format; returns its path."""
    cache_dir, out = Path(cache_dir).resolve(), Path(out).resolve()
    rootfs = build_rootfs(cache_dir / "rootfs", packages=LARGE_PACKAGES, mirror=mirror)
    return _write_image(rootfs, out, "debian-large", fmt)


def _write_image(rootfs: Path, out: Path, name: str, fmt: str) -> Path:
    """`rootfs` as a one-layer image named `name` in OUT, in the requested format (cached by name)."""
    suffix = {"oci": "-oci", "oci-archive": "-oci.tar", "docker": "-docker.tar"}[fmt]
    final = out / (name + suffix)
    if final.exists():
        return final
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as td:
        tmp = Path(td)
        if fmt == "docker":
            layer = write_layer(rootfs, tmp / "layer.tar", compression="none")
            write_docker_archive([layer.path], tmp / "image.tar", f"imagestream/{name}:latest")
            os.rename(tmp / "image.tar", final)
        else:
            write_oci_layout(rootfs, tmp / "layout")
            if fmt == "oci":
                os.rename(tmp / "layout", final)
            else:
                write_oci_archive(tmp / "layout", tmp / "image.tar")
                os.rename(tmp / "image.tar", final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imagestream_dev.imagebuild", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="image", required=True)
    p = sub.add_parser("debian-python", help="Debian bookworm minbase + python3")
    q = sub.add_parser("debian-large", help="about 1 GB of Debian packages: a JDK, numpy, scipy, pandas, ...")
    for parser in (p, q):
        parser.add_argument("--cache-dir", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--format", choices=["oci", "oci-archive", "docker"], default="oci")
        parser.add_argument("--mirror", default=None,
                            help=f"Debian mirror (default: ${MIRROR_ENV} or the host's apt source)")
    p.add_argument("--filler-mb", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.image == "debian-large":
        path = build_debian_large(args.cache_dir, args.out, fmt=args.format, mirror=args.mirror)
    else:
        path = build_debian_python(
            args.cache_dir, args.out, fmt=args.format, filler_mb=args.filler_mb, seed=args.seed, mirror=args.mirror
        )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
