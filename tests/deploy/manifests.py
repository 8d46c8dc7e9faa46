"""The rendered Kubernetes objects of an overlay, and questions about them (for the deploy tests)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml

from tests.deploy.tilt import kubectl

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.parent.name for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
CONFIGURE_SCRIPT = ROOT / "k8s" / "base" / "regional" / "cassandra" / "configure.py"


@functools.cache
def _rendered(overlay: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects, as `kubectl kustomize` renders them (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_rendered(overlay)) if d]


@dataclasses.dataclass
class Workload:
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "default")

    @property
    def pod(self) -> dict:
        return self.obj["spec"]["template"]["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.obj["spec"]["template"]["metadata"].get("labels", {})

    @property
    def app(self) -> str:
        return self.labels["app"]

    def containers(self, init: bool = True) -> list[dict]:
        return list(self.pod["containers"]) + (list(self.pod.get("initContainers", [])) if init else [])

    def container(self, name: str) -> dict:
        (found,) = [c for c in self.containers() if c["name"] == name]
        return found

    def volume(self, name: str) -> dict:
        (found,) = [v for v in self.pod.get("volumes", []) if v["name"] == name]
        return found


class Objects:
    """Index of one overlay's rendered objects."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    def of_kind(self, *kinds: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] in kinds]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name
                 and (namespace is None or d["metadata"].get("namespace") == namespace)]
        assert len(found) == 1, f"{kind} {name} (namespace {namespace}): found {len(found)}"
        return found[0]

    def workloads(self) -> list[Workload]:
        return [Workload(d) for d in self.of_kind(*WORKLOAD_KINDS)]

    def workload(self, name: str) -> Workload:
        (found,) = [w for w in self.workloads() if w.name == name]
        return found

    def by_app(self, app: str) -> list[Workload]:
        return [w for w in self.workloads() if w.app == app]

    def configmap(self, name: str, namespace: str) -> dict:
        return self.get("ConfigMap", name, namespace)

    def selected(self, service: dict) -> list[Workload]:
        """The workloads whose pods a Service selects."""
        selector = service["spec"].get("selector", {})
        namespace = service["metadata"].get("namespace")
        return [w for w in self.workloads() if w.namespace == namespace and selector
                and all(w.labels.get(k) == v for k, v in selector.items())]

    def service_for_host(self, host: str, namespace: str) -> dict:
        """The Service a DNS name in a pod of `namespace` resolves to: svc, svc.ns, svc.ns.svc[.cluster.local]."""
        parts = host.split(".")
        name, ns = parts[0], parts[1] if len(parts) > 1 else namespace
        return self.get("Service", name, ns)

    # -- containers ------------------------------------------------------------------------------
    def env(self, workload: Workload, container: dict) -> dict[str, str | None]:
        """Every variable the container gets, resolved: literal values, ConfigMap keys; None for fieldRefs."""
        values: dict[str, str | None] = {}
        for source in container.get("envFrom", []):
            values.update(self.configmap(source["configMapRef"]["name"], workload.namespace)["data"])
        for var in container.get("env", []):
            if "value" in var:
                values[var["name"]] = str(var["value"])
            elif "configMapKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["configMapKeyRef"]
                values[var["name"]] = self.configmap(ref["name"], workload.namespace)["data"][ref["key"]]
            else:
                values[var["name"]] = None
        return values

    def env_names(self, container: dict, workload: Workload) -> set[str]:
        return set(self.env(workload, container))

    def iter_containers(self) -> Iterator[tuple[Workload, dict]]:
        for w in self.workloads():
            for c in w.containers():
                yield w, c


def container_port(container: dict, port: int | str) -> int | None:
    """The number of a container port given by number or name, if the container declares it."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30,
             "Ti": 1 << 40}


def quantity(text: str | int) -> int:
    """A Kubernetes memory quantity in bytes: '384Mi' -> 402653184."""
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", str(text))
    assert m and m.group(2) in _QUANTITY, f"not a memory quantity: {text!r}"
    return int(m.group(1)) * _QUANTITY[m.group(2)]


_REDIS_UNITS = {"": 1, "k": 1000, "kb": 1 << 10, "m": 10**6, "mb": 1 << 20, "g": 10**9, "gb": 1 << 30}


def redis_memory(text: str) -> int:
    """A Redis memory setting in bytes (Redis' own units: 1mb = 1 MiB, 1m = 10^6)."""
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", text)
    assert m and m.group(2).lower() in _REDIS_UNITS, f"not a Redis memory setting: {text!r}"
    return int(m.group(1)) * _REDIS_UNITS[m.group(2).lower()]


def flag(args: list[str], name: str) -> str:
    """The value after `name` in an argument list."""
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def annotation(obj: dict, key: str) -> Any:
    return obj["metadata"].get("annotations", {}).get(key)


def load_configure_script():  # type: ignore[no-untyped-def]
    """The Cassandra init container's script (k8s/base/regional/cassandra/configure.py) as a module."""
    spec = importlib.util.spec_from_file_location("cassandra_configure", CONFIGURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
