"""Generate the protobuf and gRPC stubs from protos/ (run by the build, see setup.py)."""

from __future__ import annotations

import pathlib
import sys


def generate(proto_root: pathlib.Path, out_root: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto under proto_root into out_root, keeping the package path.

    protos/imagestream/v1/x.proto becomes out_root/imagestream/v1/x_pb2.py, so the
    proto package imagestream.v1 is the Python package imagestream.v1.
    """
    import importlib.resources

    from grpc_tools import protoc

    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    packages = {out_root / p.parent.relative_to(proto_root) for p in protos}
    for package in packages:
        # every level is a package: containerd/, containerd/services/, ... as well as imagestream/v1/
        parts = package.relative_to(out_root).parts
        for depth in range(1, len(parts) + 1):
            (out_root.joinpath(*parts[:depth]) / "__init__.py").touch()
    return sorted(packages)


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parents[2]
    for pkg in generate(root / "protos", root / "services"):
        print(f"generated {pkg}", file=sys.stderr)
