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

        generate(ROOT / "protos", ROOT / "services")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        self.run_command("build_protos")
        super().run()


setup(cmdclass={"build_protos": BuildProtos, "build_py": BuildPyWithProtos})
