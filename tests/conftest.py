"""Shared fixtures. Tests are ordered by layer: unit, contract, service, fuse, e2e.

The real local stack (Redis, Cassandra, the three tier services) is started once
per session, on ports of its own so that a developer's stack can keep running.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("IMAGESTREAM_CACHE_DIR", ROOT / ".cache")).absolute()



def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0 and shutil.which("fusermount3") is not None


needs_fuse = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse, fusermount3 and root")


def as_foreground_job() -> None:
    """A `preexec_fn` for commands a test stops with SIGINT, as Ctrl-C would: SIGINT handled as a terminal's
    foreground job has it. A test run started in the background of a non-interactive shell inherits SIGINT
    ignored, and a command started with it ignored rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def have_overlayfs() -> bool:
    try:
        with open("/proc/filesystems") as f:
            listed = any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False
    return listed and os.geteuid() == 0 and shutil.which("mount") is not None


needs_overlayfs = pytest.mark.skipif(not have_overlayfs(), reason="needs overlayfs and root")


@pytest.fixture(scope="session")
def stack_home() -> pathlib.Path:
    home = pathlib.Path(tempfile.mkdtemp(prefix="imagestream-test-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(stack_home: pathlib.Path):  # type: ignore[no-untyped-def]
    """The real local stack, up for the whole session; yields the environment that reaches it."""
    from imagestream_dev.stack import local

    # ports of its own, so that a developer's stack on the default ports can keep running
    # IMAGESTREAM_TEST_PORT_BASE moves the whole stack, so that two suites can run side by side
    port_base = int(os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100"))
    env = {**local.private_env(stack_home, CACHE, port_base), "IMAGESTREAM_REDIS_MAXMEMORY": "512MiB",
           "IMAGESTREAM_NODE_MEMORY_BYTES": "64MiB",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}  # spans reach Zipkin quickly
    with environment(env):
        try:
            local.up(print)
            yield env
        finally:
            local.down(print)


@contextlib.contextmanager
def environment(env: dict[str, str]):  # type: ignore[no-untyped-def]
    """os.environ with `env` set, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def debian_image() -> pathlib.Path:
    """A real Debian bookworm minbase + python3 image (OCI layout), built by debootstrap once and cached."""
    from imagestream_dev import imagebuild

    return imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")


@pytest.fixture(scope="session")
def debian_rootfs(debian_image: pathlib.Path) -> pathlib.Path:
    from imagestream_dev import imagebuild

    return imagebuild.build_rootfs(CACHE / "rootfs")


@pytest.fixture(scope="session")
def registries():  # type: ignore[no-untyped-def]
    """Real registries with auth on (tests/registry/conftest.py), one set for the session."""
    from tests.registry.conftest import start_registries

    yield from start_registries()


@pytest.fixture(scope="session")
def mirrored_upstream(stack, registries, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The TLS registry with auth, mirrored by the regional OCI endpoint under `hub/`."""
    from tests.registry.conftest import add_mirror

    return add_mirror(registries, tmp_path_factory.mktemp("docker"))


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """The imagestream command line, as a user runs it."""
    result = subprocess.run(
        ["imagestream", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"imagestream {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
