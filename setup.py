"""Builds the gRPC/protobuf stubs from protos/ into services/imagestream/v1 at build time.

The stubs are never committed; every build (wheel, sdist or editable install)
regenerates them, so they cannot drift from the .proto files.
"""

import pathlib

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()


class BuildProtos(Command):
    description = "generate Python gRPC stubs from protos/"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        import sys

        sys.path.insert(0, str(ROOT / "services"))
        from imagestream.protogen import generate

        services = ROOT / "services"
        generated = [".".join(p.relative_to(services).parts) for p in generate(ROOT / "protos", services)]
        # the package list was made before these existed: add them, or a fresh build leaves them out
        packages = self.distribution.packages
        packages.extend(p for p in generated if p not in packages)
        # with several `where` folders each package is mapped to its folder; map the new ones too,
        # or a fresh build looks for containerd/... at the top of the tree
        package_dir = self.distribution.package_dir
        if package_dir and "" not in package_dir:
            for p in generated:
                top = p.split(".")[0]
                package_dir.setdefault(top, "services/" + top)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        self.run_command("build_protos")
        for package in self.distribution.packages:
            if package not in self.packages:
                self.packages.append(package)
        # finalize_options copied package_dir before build_protos added to it
        for name, path in (self.distribution.package_dir or {}).items():
            self.package_dir.setdefault(name, path)
        super().run()


setup(cmdclass={"build_protos": BuildProtos, "build_py": BuildPyWithProtos})
