"""The packages' layering, read from the sources: which package may import which, and every container
image carries every package its service imports (a chunk store image once crashed at start on an import
of the CLI's registry client, which its image does not hold)."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
# stubs of containerd's and the CRI's APIs, generated from protos/ by the build (in every image too)
GENERATED = {"containerd", "cri"}
PACKAGES = sorted(p.name for p in SERVICES.iterdir() if (p / "__init__.py").exists() and p.name not in GENERATED)

# what each package may import besides `imagestream` (the runtime library) and itself
ALLOWED = {
    "imagestream": set(),
    "chunk_store": set(),
    "zonal_cache": set(),
    "node_cache": set(),
    "fuse_client": set(),
    "snapshotter": {"fuse_client"},
    "imagestream_cli": {"fuse_client"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """{other package of services/: the files of `package` that import it}, nested imports included."""
    found: dict[str, set[str]] = {}
    for path in (SERVICES / package).rglob("*.py"):
        if "v1" in path.relative_to(SERVICES / package).parts:
            continue  # generated stubs
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:  # the generated stubs may be imported by any
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_has_a_place_in_the_layering() -> None:
    assert set(PACKAGES) == set(ALLOWED)


def test_packages_import_only_what_their_layer_allows() -> None:
    wrong = {package: {other: sorted(files) for other, files in imported_packages(package).items()
                       if other != "imagestream" and other not in ALLOWED[package]}
             for package in PACKAGES}
    assert {p: w for p, w in wrong.items() if w} == {}


def _closure(package: str) -> set[str]:
    seen, todo = set(), [package]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += list(imported_packages(p))
    return seen


def test_every_image_carries_the_packages_its_service_imports() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = {"source": {"imagestream"}}  # its protogen step writes the generated stubs
    stage = None
    for line in text.splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            stage = m.group(1)
            base = line.split()[1]
            copied[stage] = set(copied.get(base, set()))
        elif stage and (m := re.match(r"COPY services/(\w+) ", line)):
            copied[stage].add(m.group(1))
    services = {"build-chunk-store": "chunk_store", "build-zonal-cache": "zonal_cache",
                "build-node-agent": "node_cache", "build-snapshotter": "snapshotter"}
    assert set(services) <= set(copied), "a service's build stage is missing from the Dockerfile"
    missing = {stage: sorted(_closure(package) - copied[stage]) for stage, package in services.items()}
    assert {s: m for s, m in missing.items() if m} == {}
