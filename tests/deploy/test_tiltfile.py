"""The Tiltfile, evaluated with starlark-pyo3 against stubs of Tilt's builtins, with a cluster and without."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import yaml

from tests.deploy import dockerfile
from tests.deploy.manifests import ROOT, Objects, container_port, render
from tests.deploy.tilt import Tilt, TiltfileError

LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")  # Tilt's rule for a label


def resources(tilt: Tilt) -> dict[str, dict]:
    """Tilt resource name -> the call that defines or configures it."""
    found = {c["name"]: c for c in tilt.called("local_resource")}
    for c in tilt.called("k8s_resource"):
        found[c["new_name"] or c["workload"]] = c
    return found


# -- with a cluster ------------------------------------------------------------------------------

def test_builds_every_image_of_the_dockerfile_from_the_repository_root(tilt_k8s: Tilt) -> None:
    builds = tilt_k8s.called("docker_build")
    _, stages = dockerfile.parse()
    assert builds, "no docker_build"
    for build in builds:
        assert build["context"] == "."
        assert tilt_k8s.path(build["dockerfile"]) == dockerfile.DOCKERFILE
        assert build["target"] == build["ref"], "one name: image = build target"
        assert build["ref"] in stages, f"{build['ref']}: no such stage in the Dockerfile"
    # every final stage that runs something is an image Tilt builds
    runnable = {name for name, stage in stages.items() if stage.all("ENTRYPOINT") or stage.all("CMD")}
    assert runnable == {b["ref"] for b in builds}


def test_build_context_is_exactly_what_the_dockerfile_copies(tilt_k8s: Tilt) -> None:
    """`only=` narrows each context to the shared package, the image's service package(s) and the protos:
    nothing the Dockerfile reads may be left out, nothing else let in."""
    _, stages = dockerfile.parse()
    for build in tilt_k8s.called("docker_build"):
        only = {p.rstrip("/") for p in build["only"]}
        copied = dockerfile.copied_from_context(stages, build["target"])
        assert copied <= only, f"{build['ref']}: the Dockerfile copies {copied - only} outside only="
        assert only <= copied, f"{build['ref']}: only= lets in {only - copied}, which the Dockerfile never reads"
        for path in only:
            assert tilt_k8s.path(path).exists(), path


def test_deploys_the_dev_overlay_and_its_workloads_are_resources(tilt_k8s: Tilt) -> None:
    (kustomized,) = tilt_k8s.called("kustomize")
    assert kustomized["pathToDir"] == "k8s/overlays/dev"
    assert (tilt_k8s.path(kustomized["pathToDir"]) / "kustomization.yaml").is_file()
    (applied,) = tilt_k8s.called("k8s_yaml")
    objects = Objects(render("dev"))
    assert [d for d in yaml.safe_load_all(applied["yaml"]) if d] == objects.docs
    workloads = {w.name: w for w in objects.workloads()} | {j["metadata"]["name"]: j for j in objects.of_kind("Job")}
    configured = {c["workload"] for c in tilt_k8s.called("k8s_resource")}
    assert configured == set(workloads), "every workload (and Job) gets a label and its dependencies"
    # the Secrets the manifests mount are made before anything that mounts them starts
    (secrets,) = [c for c in tilt_k8s.called("local_resource") if c["name"] == "backend-secrets"]
    assert secrets["cmd"] == ["scripts/k8s-secrets", "imagestream"]
    for name in ("cassandra", "redis"):
        assert "backend-secrets" in resources(tilt_k8s)[name]["resource_deps"]
    defined = set(resources(tilt_k8s))
    for name, call in resources(tilt_k8s).items():
        assert set(call["resource_deps"]) <= defined, f"{name} depends on {set(call['resource_deps']) - defined}"
        labels = call["labels"] if isinstance(call["labels"], list) else [call["labels"]]
        assert labels and all(LABEL.fullmatch(label) for label in labels), (name, labels)


def test_port_forwards_reach_declared_container_ports(tilt_k8s: Tilt) -> None:
    objects = Objects(render("dev"))
    forwarded = {}
    for call in tilt_k8s.called("k8s_resource"):
        if not call["port_forwards"]:
            continue
        workload = objects.workload(call["workload"])
        for forward in call["port_forwards"]:
            port = forward["container_port"] or forward["local_port"]
            assert any(container_port(c, port) for c in workload.containers()), f"{workload.name}: no port {port}"
            forwarded[workload.name] = forward
    zipkin = forwarded["zipkin"]  # the tracing UI
    assert zipkin["link_path"] == "/zipkin/"


def test_every_image_a_workload_runs_is_built_or_pinned(tilt_k8s: Tilt) -> None:
    """Tilt replaces the bare names it builds; every other image must be a pinned public one."""
    built = {b["ref"] for b in tilt_k8s.called("docker_build")}
    used = set()
    for workload, container in Objects(render("dev")).iter_containers():
        image = container["image"]
        used.add(image)
        if image not in built:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), \
                f"{workload.name}/{container['name']}: {image} is neither built by the Tiltfile nor pinned"
    assert built <= used, f"built but never deployed: {built - used}"


def test_images_of_the_multi_zone_overlay_are_the_tilt_builds_in_a_registry(tilt_k8s: Tilt) -> None:
    built = {b["ref"] for b in tilt_k8s.called("docker_build")}
    ours = set()
    for _, container in Objects(render("multi-zone")).iter_containers():
        repository = container["image"].rsplit(":", 1)[0]
        if repository.rsplit("/", 1)[-1] in built:
            ours.add(repository.rsplit("/", 1)[-1])
            assert "/" in repository, f"{container['image']}: the multi-zone overlay names a registry"
    assert ours == built


# -- without a cluster -----------------------------------------------------------------------------

def test_local_branch_serves_the_processes_of_the_shared_definition(tilt_local: Tilt, definition: list) -> None:
    served = [c for c in tilt_local.called("local_resource") if c["serve_cmd"]]
    assert [c["name"] for c in served] == [p.name.replace("_", "-") for p in definition]
    assert not tilt_local.called("docker_build") and not tilt_local.called("k8s_yaml")
    for resource, process in zip(served, definition):
        assert resource["serve_cmd"] == process.command, resource["name"]
        assert resource["serve_env"] == process.env, resource["name"]


def test_local_branch_prepares_checks_and_orders_like_stack_up(tilt_local: Tilt, definition: list) -> None:
    served = [c for c in tilt_local.called("local_resource") if c["serve_cmd"]]
    for i, (resource, process) in enumerate(zip(served, definition)):
        # cmd runs before serve_cmd: the process's one-time set-up, through the same module
        assert resource["cmd"][-4:] == ["-m", "imagestream_dev.stack.local", "--prepare", process.name]
        probe = resource["readiness_probe"]
        assert probe["exec"]["command"][-4:] == ["-m", "imagestream_dev.stack.local", "--check", process.name]
        assert probe["timeout_secs"] >= 5, "the CQL check alone may take a few seconds"
        phase = getattr(process, "phase", None)  # processes of one phase start together, as in `stack up`
        waits = [r["name"] for r, p in zip(served[:i], definition) if phase is None or p.phase < phase]
        assert resource["resource_deps"] == waits, resource["name"]


def test_local_branch_restarts_a_service_when_its_code_changes(tilt_local: Tilt, definition: list) -> None:
    for resource in tilt_local.called("local_resource"):
        for dep in resource["deps"] or []:
            assert tilt_local.path(dep).is_dir(), dep
        if "-m" in resource["serve_cmd"]:
            module = resource["serve_cmd"][resource["serve_cmd"].index("-m") + 1]
            assert f"services/{module}" in resource["deps"] and "services/imagestream" in resource["deps"]
            assert "**/__pycache__" in resource["ignore"], "Python's own writes must not restart it"


def test_local_branch_starts_a_phase_together(tilt_env: dict[str, str], tmp_path: pathlib.Path) -> None:
    """A definition with start phases (backends together, then the tiers): each resource waits for the
    earlier phases only. The definition is given by a stand-in for `python -m imagestream_dev.stack.local`."""
    definition = [
        {"name": "zipkin", "command": ["java", "-jar", "zipkin.jar"], "ready": ["http", "u"], "env": {}, "phase": 0},
        {"name": "redis", "command": ["redis-server"], "ready": ["redis", "h", 1], "env": {}, "phase": 0},
        {"name": "chunk_store", "command": ["py", "-m", "chunk_store"], "ready": ["grpc", "t"], "env": {}, "phase": 1},
        {"name": "node_cache", "command": ["py", "-m", "node_cache"], "ready": ["grpc", "t"], "env": {}, "phase": 2},
    ]
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(definition)}\nEOF\n")
    stand_in.chmod(0o755)
    tilt = Tilt(ROOT / "Tiltfile", k8s_context="", env={**tilt_env, "PYTHON": str(stand_in)}).evaluate()
    waits = {c["name"]: c["resource_deps"] for c in tilt.called("local_resource")}
    assert waits == {"zipkin": [], "redis": [], "chunk-store": ["zipkin", "redis"],
                     "node-cache": ["zipkin", "redis", "chunk-store"],
                     "smoke-test": ["zipkin", "redis", "chunk-store", "node-cache"]}
    labels = {c["name"]: c["labels"] for c in tilt.called("local_resource")}
    assert labels["zipkin"] == ["tracing"] and labels["chunk-store"] == ["regional"]


def test_prepare_and_check_commands_run(tilt_local: Tilt, tilt_env: dict[str, str]) -> None:
    """The commands Tilt runs besides serve_cmd: a prepare with nothing to do, a check of a process that is down."""
    import subprocess

    (zonal,) = [c for c in tilt_local.called("local_resource") if c["name"] == "zonal-cache"]
    env = {**tilt_env, **zonal["env"], "IMAGESTREAM_ZONAL_CACHE_LISTEN": "127.0.0.1:1"}  # nothing listens there
    prepared = subprocess.run(zonal["cmd"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert prepared.returncode == 0, prepared.stderr
    check = zonal["readiness_probe"]["exec"]["command"]
    checked = subprocess.run(check, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1 and "not ready" in checked.stdout, checked.stdout + checked.stderr


# -- both ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["k8s", "local"])
def test_smoke_test_runs_last(mode: str, tilt_k8s: Tilt, tilt_local: Tilt) -> None:
    tilt = tilt_k8s if mode == "k8s" else tilt_local
    (smoke,) = [c for c in tilt.called("local_resource") if c["name"] == "smoke-test"]
    script = tilt.path(smoke["cmd"][0])
    assert script.is_file() and os.access(script, os.X_OK), script
    others = set(resources(tilt)) - {"smoke-test"}
    waited = set(smoke["resource_deps"])
    # it waits for every resource, directly or through the resources it waits for
    closure = set(waited)
    while True:
        more = {d for name in closure for d in resources(tilt)[name]["resource_deps"]} - closure
        if not more:
            break
        closure |= more
    assert others <= closure, f"smoke-test may start before {others - closure}"
    assert (mode == "k8s") == ("--k8s" in smoke["cmd"])


@pytest.mark.parametrize("mode", ["k8s", "local"])
def test_every_path_the_tiltfile_names_exists(mode: str, tilt_k8s: Tilt, tilt_local: Tilt) -> None:
    tilt = tilt_k8s if mode == "k8s" else tilt_local
    paths = [c["file_path"] for c in tilt.called("watch_file")] + [c["pathToDir"] for c in tilt.called("kustomize")]
    for build in tilt.called("docker_build"):
        paths += [build["context"], build["dockerfile"], *build["only"]]
    for resource in tilt.called("local_resource"):
        paths += list(resource["deps"] or [])
        for cmd in (resource["cmd"], resource["serve_cmd"]):
            if isinstance(cmd, list) and cmd and "/" in cmd[0] and not cmd[0].startswith("/"):
                paths.append(cmd[0])  # a script of the repository
    assert paths
    missing = [p for p in paths if not tilt.path(p).exists()]
    assert not missing, missing


# -- choosing the mode, and the stubs themselves -----------------------------------------------------

def test_mode_can_be_forced_either_way(tilt_env: dict[str, str]) -> None:
    forced_local = Tilt(ROOT / "Tiltfile", k8s_context="kind-x", env=tilt_env, config_args={"mode": "local"}).evaluate()
    assert forced_local.called("local_resource") and not forced_local.called("docker_build")
    by_env = Tilt(ROOT / "Tiltfile", k8s_context="", env={**tilt_env, "TILT_IMAGESTREAM_MODE": "k8s"}).evaluate()
    assert by_env.called("docker_build")
    with pytest.raises(TiltfileError, match="--mode must be"):
        Tilt(ROOT / "Tiltfile", k8s_context="", env=tilt_env, config_args={"mode": "docker"}).evaluate()


def test_stubs_reject_arguments_tilt_does_not_have(tmp_path: pathlib.Path) -> None:
    """The stubs are as strict as Tilt: a misspelt argument fails the evaluation."""
    tiltfile = tmp_path / "Tiltfile"
    tiltfile.write_text("local_resource('x', cmd='true', serve_command='sleep 1')\n")
    with pytest.raises(TiltfileError, match="serve_command"):
        Tilt(tiltfile, k8s_context="", env={}).evaluate()
    tiltfile.write_text("local_resource('x', cmd='true', readiness_probe=exec_action(['true']))\n")
    with pytest.raises(TiltfileError, match="probe"):
        Tilt(tiltfile, k8s_context="", env={}).evaluate()
