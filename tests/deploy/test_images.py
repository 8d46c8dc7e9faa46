"""The Dockerfile, read (no Docker engine here): what each image copies, runs, checks and runs as."""

from __future__ import annotations

import fnmatch
import re

import pytest

from imagestream import config
from imagestream.rpc import healthcheck
from tests.deploy import dockerfile

ARGS, STAGES = dockerfile.parse()
TARGETS = sorted(n for n, s in STAGES.items() if s.all("ENTRYPOINT") or s.all("CMD"))
NEEDS_ROOT = {"node-agent", "snapshotter"}  # FUSE mounts, overlayfs, chroot


def test_one_image_per_service_named_after_it() -> None:
    """Each image runs one of the service packages (kebab-case image, snake_case package) or holds them."""
    assert TARGETS == ["chunk-store", "node-agent", "snapshotter", "zonal-cache"]
    for target in TARGETS:
        module = dockerfile.python_module(dockerfile.final_command(STAGES, target))
        assert module in ("chunk_store", "zonal_cache", "node_cache", "snapshotter"), target
        assert (dockerfile.ROOT / "services" / module / "__main__.py").is_file()
        if target != "node-agent":
            assert module == target.replace("-", "_"), "image name = package name in kebab-case"


@pytest.mark.parametrize("target", TARGETS)
def test_small_python_base_and_no_build_tools_at_runtime(target: str) -> None:
    chain = dockerfile.chain(STAGES, target)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", chain[0].base), chain[0].base
    installs = " ".join(i.value for s in chain for i in s.all("RUN"))  # the image's own layers (not COPY --from)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|libfuse3-dev|-dev)\b", installs), installs
    copies = [i.value for s in chain for i in s.all("COPY")]
    assert any("--from=" in c for c in copies), "the virtualenv comes from a build stage"


@pytest.mark.parametrize("target", TARGETS)
def test_copies_only_its_packages_from_an_allowed_context(target: str) -> None:
    copied = dockerfile.copied_from_context(STAGES, target)
    module = dockerfile.python_module(dockerfile.final_command(STAGES, target))
    assert f"services/{module}" in copied and "services/imagestream" in copied and "protos" in copied
    other_services = {f"services/{m}" for m in ("chunk_store", "zonal_cache", "node_cache", "fuse_client")} - {
        f"services/{module}"}
    if target in ("node-agent", "snapshotter"):
        other_services.discard("services/fuse_client")  # the node agent mounts, too
        assert "services/fuse_client" in copied
    assert not copied & other_services, f"{target} copies {copied & other_services}"
    assert not any(p.startswith("services/imagestream/v1") for p in copied), "stubs are generated, not copied"
    ignore = (dockerfile.ROOT / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for path in copied:
        assert (dockerfile.ROOT / path).exists(), path
        assert any(path == a or path.startswith(a + "/") or fnmatch.fnmatch(path, a) for a in allowed), \
            f"{path} is excluded by .dockerignore"


@pytest.mark.parametrize("target", TARGETS)
def test_health_check_asks_the_service_it_runs(target: str) -> None:
    (check,) = [i for s in dockerfile.chain(STAGES, target) for i in s.all("HEALTHCHECK")]
    words = check.value.split("CMD", 1)[1]
    command = dockerfile.Instruction("CMD", words).exec_form()
    module = dockerfile.python_module(dockerfile.final_command(STAGES, target))
    assert command == ["python", "-m", "imagestream.rpc.healthcheck", module]
    assert module in healthcheck.TIERS


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_non_root_unless_it_mounts(target: str) -> None:
    users = [i.value for s in dockerfile.chain(STAGES, target) for i in s.all("USER")]
    if target in NEEDS_ROOT:
        assert not users, f"{target} runs as root: FUSE"
    else:
        assert users and users[-1].split(":")[0] not in ("0", "root"), target


@pytest.mark.parametrize("target", TARGETS)
def test_image_settings_are_settings_and_ports_are_exposed(target: str) -> None:
    env = dockerfile.env(STAGES, target)
    ours = {k: v for k, v in env.items() if k.startswith(config.PREFIX)}
    assert set(ours) <= {s.env for s in config.SETTINGS.values()}, set(ours)
    exposed = {int(p.split("/")[0]) for s in dockerfile.chain(STAGES, target) for i in s.all("EXPOSE")
               for p in i.value.split()}
    listens = {int(v.rpartition(":")[2]) for k, v in ours.items() if k.endswith("_LISTEN")}
    assert exposed == listens, (target, exposed, listens)
    for key, value in ours.items():
        if key.endswith("_LISTEN"):
            assert value.startswith(("0.0.0.0:", "[::]:")), f"{target}: {key}={value} unreachable from outside"


def test_stubs_are_generated_before_the_wheel_is_built() -> None:
    """On a fresh tree setup.py lists the packages before it generates imagestream.v1: the Dockerfile runs
    protogen first, or the wheel ships without the stubs (found by building it outside Docker)."""
    builders = [s for s in STAGES.values() if any("pip wheel" in i.value for i in s.all("RUN"))]
    assert builders
    for stage in builders:
        runs = [i.value for s in dockerfile.chain(STAGES, stage.name) for i in s.all("RUN")]
        generated = [n for n, r in enumerate(runs) if "imagestream/protogen.py" in r]
        built = [n for n, r in enumerate(runs) if "pip wheel" in r]
        assert generated and generated[0] < built[0], stage.name
