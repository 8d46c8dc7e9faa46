"""k8s/: every overlay renders, validates strictly against a pinned Kubernetes, and holds together.

The consistency checks read the rendered objects, the code (imagestream.config.SETTINGS, the services'
SETTINGS, the local stack's definition) and the Dockerfile, so a rename on either side fails here.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import urllib.parse

import pytest

from imagestream import config
from tests.deploy import dockerfile
from tests.deploy.manifests import (CONFIGURE_SCRIPT, OVERLAYS, ROOT, Objects, Workload, annotation, container_port, flag,
                                    load_configure_script, quantity, redis_memory, render)

# The Kubernetes release the manifests are written for (kubernetes-validate ships schemas 1.25 ... 1.37):
# 1.33 has everything they use as GA (trafficDistribution, native gRPC probes, minDomains, sidecar-free).
KUBERNETES_VERSION = "1.33.0"
ZONE_LABEL = "imagestream.dev/zone"
NODE_ZONE = "topology.kubernetes.io/zone"
OVERHEAD_ANNOTATION = "imagestream.dev/node-cache-memory-overhead"
# Variables the third-party images read: the official cassandra image's docker-entrypoint.sh and
# cassandra-env.sh, the openzipkin/zipkin server. (Ours must be read by our code; see below.)
THIRD_PARTY_ENV = {
    "cassandra": {"CASSANDRA_CLUSTER_NAME", "CASSANDRA_SEEDS", "CASSANDRA_ENDPOINT_SNITCH", "MAX_HEAP_SIZE",
                  "HEAP_NEWSIZE", "JVM_EXTRA_OPTS"},
    "openzipkin/zipkin": {"STORAGE_TYPE", "MEM_MAX_SPANS", "JAVA_OPTS"},
    "redis": {"ZONAL_CACHE_ACL"},  # read by the acl init container's script
}

pytestmark = pytest.mark.parametrize("overlay", OVERLAYS)


@pytest.fixture
def objects(overlay: str) -> Objects:
    return Objects(render(overlay))


def ours() -> set[str]:
    """The images this repository builds: the Dockerfile's runnable targets."""
    _, stages = dockerfile.parse()
    return {n for n, s in stages.items() if s.all("ENTRYPOINT") or s.all("CMD")}


def image_name(image: str) -> str:
    """'registry.example.com/imagestream/chunk-store:0.1.0' -> 'chunk-store'; 'redis:7.4' -> 'redis'."""
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return repository.rsplit("/", 1)[-1] if repository.rsplit("/", 1)[-1] in ours() else repository


def argv(container: dict) -> list[str]:
    """What a container of one of our images runs: the image's ENTRYPOINT + the container's args (or CMD)."""
    _, stages = dockerfile.parse()
    target = image_name(container["image"])
    entrypoint = [i.exec_form() for s in dockerfile.chain(stages, target) for i in s.all("ENTRYPOINT")][-1]
    if "command" in container:
        return container["command"] + container.get("args", [])
    return entrypoint + container["args"] if "args" in container else dockerfile.final_command(stages, target)


def module_settings(module: str | None) -> set[str]:
    """The IMAGESTREAM_* variables a process reads: a service's SETTINGS, or all of them for the CLI."""
    if module is None:  # a shell for `imagestream ...` (the CLI takes every setting)
        return {s.env for s in config.SETTINGS.values()}
    names = importlib.import_module(f"{module}.__main__").SETTINGS
    return {config.SETTINGS[n].env for n in names}


def listen_setting(module: str) -> str | None:
    """The IMAGESTREAM_*_LISTEN variable of a tier (None: the node cache, on a Unix socket)."""
    from imagestream.rpc import healthcheck

    setting = healthcheck.TIERS.get(module)
    return config.SETTINGS[setting].env if setting and setting.endswith("_listen") else None


def addresses(env: dict[str, str | None]) -> list[tuple[str, str, int]]:
    """(variable, host, port) of every upstream a container is told to reach."""
    found = []
    for name in ("IMAGESTREAM_ZONAL_UPSTREAMS", "IMAGESTREAM_NODE_UPSTREAMS", "IMAGESTREAM_REGION"):
        for address in config.parse_list(env.get(name) or ""):
            host, _, port = address.rpartition(":")
            found.append((name, host, int(port)))
    for host in config.parse_list(env.get("IMAGESTREAM_CASSANDRA_HOSTS") or ""):
        found.append(("IMAGESTREAM_CASSANDRA_HOSTS", host, int(env.get("IMAGESTREAM_CASSANDRA_PORT") or 9042)))
    for name, default_port in (("IMAGESTREAM_REDIS_URL", 6379), ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", 80)):
        if env.get(name):
            url = urllib.parse.urlparse(env[name])
            found.append((name, url.hostname, url.port or default_port))
    return found


# -- rendering and schema ----------------------------------------------------------------------------

def test_renders_and_validates_strictly(overlay: str, objects: Objects) -> None:
    import kubernetes_validate

    assert len(objects.docs) > 10
    for doc in objects.docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    # the validator does reject what Kubernetes would: a misspelt field
    service = copy.deepcopy(objects.of_kind("Service")[0])
    service["spec"]["trafficDistributon"] = "PreferClose"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_references_resolve(overlay: str, objects: Objects) -> None:
    """ConfigMaps, keys, service accounts and priority classes the pods name exist (generated names included)."""
    for workload, container in objects.iter_containers():
        objects.env(workload, container)  # raises on a missing ConfigMap or key
    for workload in objects.workloads():
        for volume in workload.pod.get("volumes", []):
            if "configMap" in volume:
                data = objects.configmap(volume["configMap"]["name"], workload.namespace)["data"]
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(data)
        for mount in (m for c in workload.containers() for m in c.get("volumeMounts", [])):
            assert mount["name"] in {v["name"] for v in workload.pod.get("volumes", [])} | {
                t["metadata"]["name"] for t in workload.obj["spec"].get("volumeClaimTemplates", [])}, mount
        if "serviceAccountName" in workload.pod:
            objects.get("ServiceAccount", workload.pod["serviceAccountName"], workload.namespace)
        if "priorityClassName" in workload.pod:
            objects.get("PriorityClass", workload.pod["priorityClassName"])
        objects.get("Namespace", workload.namespace)
    for binding in objects.of_kind("ClusterRoleBinding", "RoleBinding"):
        objects.get(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for subject in binding["subjects"]:
            objects.get("ServiceAccount", subject["name"], subject["namespace"])


# -- names, labels, selectors ------------------------------------------------------------------------

def test_one_name_per_service(overlay: str, objects: Objects) -> None:
    """A workload, its Service, its `app` label and its image share one name (a zone's copy adds -ZONE)."""
    for workload in objects.workloads():
        meta = workload.obj["metadata"]["labels"]
        for labels in (meta, workload.labels):
            assert labels["app"] == labels["app.kubernetes.io/name"] == workload.app
            assert labels["app.kubernetes.io/part-of"] == "imagestream"
        if ZONE_LABEL in workload.labels:
            assert workload.name.startswith(workload.app + "-"), workload.name
        else:
            assert workload.name == workload.app
        selector = workload.obj["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload.labels.items()
        # the node agent's pod also runs the snapshotter, an image of its own
        images = {workload.app, "snapshotter"} if workload.app == "node-agent" else {workload.app}
        for container in workload.containers():
            if image_name(container["image"]) in ours():
                assert image_name(container["image"]) in images, (workload.name, container["image"])
    for service in objects.of_kind("Service"):
        selected = objects.selected(service)
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        name = service["metadata"]["name"]
        # a workload's Service is named after it; a second Service of it adds what it is for (chunk-store-registry)
        assert {w.app for w in selected} == {name} or [name.startswith(w.app + "-") for w in selected] == [True], name


def test_services_reach_declared_ports(overlay: str, objects: Objects) -> None:
    for service in objects.of_kind("Service"):
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in objects.selected(service):
                assert any(container_port(c, target) for c in workload.containers()), \
                    f"Service {service['metadata']['name']}: {workload.name} has no container port {target}"


# -- ports, probes, addresses ------------------------------------------------------------------------

def test_tiers_listen_where_their_ports_and_probes_are(overlay: str, objects: Objects) -> None:
    checked = set()
    for workload, container in objects.iter_containers():
        if image_name(container["image"]) not in ours():
            continue
        module = dockerfile.python_module(argv(container))
        if module not in ("chunk_store", "zonal_cache"):
            continue
        env = objects.env(workload, container)
        listen = env.get(listen_setting(module))
        assert listen, f"{workload.name}: {listen_setting(module)} must be set in the manifest"
        host, _, port = listen.rpartition(":")
        assert host in ("0.0.0.0", "[::]"), f"{workload.name} listens on {host}: unreachable from other pods"
        assert container_port(container, int(port)) == int(port)
        source = (ROOT / "services" / module / "__main__.py").read_text()
        assert re.search(rf'serve\(\s*"{module}"', source), f"{module} registers another health service name"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if kind != "startupProbe":
                assert probe, f"{workload.name}: no {kind}"
            if probe:  # mTLS: the kubelet's grpc probe cannot present a certificate; the health check can
                assert probe["exec"]["command"] == ["python", "-m", "imagestream.rpc.healthcheck", module], \
                    (workload.name, kind)
                assert "grpc" not in probe and probe["timeoutSeconds"] >= 5, (workload.name, kind)
        checked.add(module)
    assert checked == {"chunk_store", "zonal_cache"}


def test_node_cache_is_on_a_node_socket_only(overlay: str, objects: Objects) -> None:
    (agent,) = objects.of_kind("DaemonSet")
    agent = Workload(agent)
    node_cache = [c for c in agent.containers() if dockerfile.python_module(argv(c)) == "node_cache"]
    assert len(node_cache) == 1
    node_cache = node_cache[0]
    env = objects.env(agent, node_cache)
    socket = env["IMAGESTREAM_NODE_CACHE_SOCKET"]
    # no TCP port for the chunk API (the node only); the one port is Prometheus's, where the process serves it
    metrics_port = int(env["IMAGESTREAM_NODE_CACHE_METRICS"].rpartition(":")[2])
    assert node_cache.get("ports") == [{"name": "metrics", "containerPort": metrics_port}]
    assert not agent.pod.get("hostNetwork")
    assert not [s for s in objects.of_kind("Service") if agent in objects.selected(s)], "no Service for it"
    for kind in ("readinessProbe", "livenessProbe"):
        assert node_cache[kind]["exec"]["command"] == ["python", "-m", "imagestream.rpc.healthcheck", "node_cache"]

    def host_dir(container: dict, path: str) -> str:
        """The node directory a container sees at `path` (it must be a hostPath mount)."""
        for mount in container["volumeMounts"]:
            if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
                return agent.volume(mount["name"])["hostPath"]["path"] + path[len(mount["mountPath"]):]
        raise AssertionError(f"{container['name']}: {path} is not on a hostPath volume")

    for other in agent.containers():
        other_env = objects.env(agent, other)
        # every container of the agent (the FUSE client, the health checks) finds the node cache's socket,
        # and the state folder whose chunk files the node cache hands to the FUSE client by path
        assert other_env["IMAGESTREAM_NODE_CACHE_SOCKET"] == socket
        assert host_dir(other, os.path.dirname(socket)) == host_dir(node_cache, os.path.dirname(socket))
        assert host_dir(other, other_env["IMAGESTREAM_HOME"]) == host_dir(node_cache, env["IMAGESTREAM_HOME"])


def test_upstream_addresses_reach_a_service_and_the_port_behind_it(overlay: str, objects: Objects) -> None:
    reached = set()
    for workload, container in objects.iter_containers():
        for variable, host, port in addresses(objects.env(workload, container)):
            service = objects.service_for_host(host, workload.namespace)
            (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port] or [None]
            assert entry, f"{workload.name}: {variable} names {host}:{port}, a port Service {host} lacks"
            for backend in objects.selected(service):
                for c in backend.containers(init=False):
                    number = container_port(c, entry.get("targetPort", port))
                    if number is None:
                        continue
                    if image_name(c["image"]) in ours():  # the process listens on that port
                        listen = objects.env(backend, c)[listen_setting(dockerfile.python_module(argv(c)))]
                        assert listen.endswith(f":{number}"), (backend.name, listen, number)
                    reached.add((variable, service["metadata"]["name"]))
    assert {v for v, _ in reached} >= {"IMAGESTREAM_ZONAL_UPSTREAMS", "IMAGESTREAM_NODE_UPSTREAMS",
                                        "IMAGESTREAM_CASSANDRA_HOSTS", "IMAGESTREAM_REDIS_URL",
                                        "OTEL_EXPORTER_ZIPKIN_ENDPOINT"}


def test_every_container_has_probes_and_resources(overlay: str, objects: Objects) -> None:
    for workload in objects.workloads():
        for container in workload.containers():
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (workload.name, container["name"])
            assert "memory" in resources.get("limits", {}), (workload.name, container["name"])
            assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
        for container in workload.containers(init=False):
            assert "readinessProbe" in container, (workload.name, container["name"])
            serves = container.get("ports") or "IMAGESTREAM_NODE_CACHE_SOCKET" in objects.env(workload, container) \
                and dockerfile.python_module(argv(container)) == "node_cache"
            if serves:
                assert "livenessProbe" in container, (workload.name, container["name"])


# -- environment variables ---------------------------------------------------------------------------

def test_environment_variables_are_ones_the_code_reads(overlay: str, objects: Objects) -> None:
    """Ours: IMAGESTREAM_* the process reads (its SETTINGS), OTEL_* (checked below), or variables only used
    to compose another one ($(NAME)). Third-party images: the variables their entrypoints document."""
    configure_reads = set(re.findall(r'os\.environ\["(\w+)"\]', CONFIGURE_SCRIPT.read_text()))
    for workload, container in objects.iter_containers():
        names = objects.env_names(container, workload)
        composed = {n for var in container.get("env", []) for n in re.findall(r"\$\((\w+)\)", str(var.get("value", "")))}
        image = image_name(container["image"])
        if image in ours():
            allowed = module_settings(dockerfile.python_module(argv(container))) | composed
            unknown = {n for n in names - allowed if not n.startswith("OTEL_")}
        elif "configure.py" in " ".join(container.get("command", [])):
            unknown = names - configure_reads
            assert configure_reads <= names, f"configure.py also needs {configure_reads - names}"
        else:
            unknown = names - THIRD_PARTY_ENV[image.split(":")[0]]
        assert not unknown, f"{workload.name}/{container['name']}: nothing reads {sorted(unknown)}"
        assert not {n for n in composed if n not in names}, f"{workload.name}: $(...) of an undefined variable"


def test_every_process_of_ours_is_traced_under_its_name(overlay: str, objects: Objects) -> None:
    for workload, container in objects.iter_containers():
        if image_name(container["image"]) not in ours():
            continue
        env = objects.env(workload, container)
        assert env.get("OTEL_SERVICE_NAME") == container["name"], (workload.name, container["name"])
        assert env.get("OTEL_TRACES_EXPORTER"), f"{workload.name}/{container['name']}: no envFrom otel"


def test_otel_variables_are_read_by_the_opentelemetry_sdk(overlay: str, objects: Objects) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.environment_variables", reason="opentelemetry-sdk not installed")
    api = importlib.import_module("opentelemetry.environment_variables")
    known = {v for module in (sdk, api) for k, v in vars(module).items() if k.startswith("OTEL_")}
    used = {n for w, c in objects.iter_containers() for n in objects.env_names(c, w) if n.startswith("OTEL_")}
    assert used, "no OTEL_* variables"
    assert used <= known, f"not OpenTelemetry SDK variables: {sorted(used - known)}"


# -- memory ------------------------------------------------------------------------------------------

def test_redis_memory_limit_covers_maxmemory(overlay: str, objects: Objects, definition: list) -> None:
    """Limit = maxmemory + 25% (fragmentation, client buffers), and never far more; the eviction and
    persistence flags are the local stack's."""
    from imagestream_dev.stack import local

    local_settings = dict(local.redis_settings())
    redises = [(w, c) for w, c in objects.iter_containers() if c["image"].split(":")[0] == "redis" and c["name"] == "redis"]
    assert redises
    for workload, container in redises:
        args = container["args"]
        maxmemory = redis_memory(flag(args, "--maxmemory"))
        limit = quantity(container["resources"]["limits"]["memory"])
        assert maxmemory * 1.25 <= limit <= maxmemory * 2 + (64 << 20), (workload.name, maxmemory, limit)
        assert quantity(container["resources"]["requests"]["memory"]) == limit  # never evicted for memory
        for name in ("maxmemory-policy", "save", "appendonly"):
            assert flag(args, "--" + name) == local_settings[name].strip('"'), name
        assert container_port(container, int(flag(args, "--port"))), "Redis listens on its declared port"


def test_backends_ask_for_a_login_from_secrets_never_a_command_line(overlay: str, objects: Objects) -> None:
    """Redis: its ACL users from the acl init container (the local stack's rule for the zonal cache); the
    zonal cache and the chunk store read their passwords from mounted Secrets; the chunk store's pod holds
    its own password only, the schema Job the superuser's."""
    from imagestream_dev.stack import credentials

    for workload in objects.by_app("redis"):
        acl = workload.container("acl")
        assert objects.env(workload, acl)["ZONAL_CACHE_ACL"] == credentials.ZONAL_CACHE_ACL
        assert "user default off" in acl["command"][-1]
        redis = workload.container("redis")
        assert redis["args"][:2] == ["redis-server", "/config/users.conf"]
        assert "--protected-mode" not in redis["args"] and "--requirepass" not in redis["args"]
        assert workload.volume("config")["emptyDir"]["medium"] == "Memory"
    secret_keys = {}
    for workload in [*objects.workloads(), *(Workload(j) for j in objects.of_kind("Job"))]:
        for volume in workload.pod.get("volumes", []):
            if "secret" in volume:
                secret_keys.setdefault(workload.app, set()).update(i["key"] for i in volume["secret"].get("items", []))
        for container in workload.containers():
            env = objects.env(workload, container)
            for name, value in env.items():
                if name.endswith("_PASSWORD_FILE"):  # a file of a mounted Secret
                    assert any(value.startswith(m["mountPath"] + "/") for m in container.get("volumeMounts", [])), \
                        (workload.name, name, value)
            assert not [n for n in env if "PASSWORD" in n and not n.endswith("_FILE")], workload.name
    assert secret_keys["chunk-store"] == {"chunk-store-password"}
    assert secret_keys["chunk-store-schema"] == {"admin-password", "chunk-store-password"}
    assert secret_keys["zonal-cache"] == secret_keys["redis"] == {"zonal-cache-password"}
    assert secret_keys["cassandra"] == {"jmx-password"}
    # every key mounted is one scripts/k8s-secrets makes
    script = (ROOT / "scripts" / "k8s-secrets").read_text()
    for keys in secret_keys.values():
        for key in keys:
            assert re.search(rf"^make \S+ .*\b{key}\b", script, re.M), key
    store = objects.by_app("chunk-store")[0]
    assert objects.env(store, store.container("chunk-store"))["IMAGESTREAM_CASSANDRA_USERNAME"] == "chunk_store"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _allowed_peers(policy: dict, port: str) -> set[tuple[str, str]]:
    """(namespace or '*', app) pairs a policy lets reach `port` (named) of the pods it selects."""
    peers = set()
    for rule in policy["spec"].get("ingress", []):
        if port not in {p["port"] for p in rule.get("ports", [])}:
            continue
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "*")
            else:
                ns = policy["metadata"]["namespace"]
            app = peer.get("podSelector", {}).get("matchLabels", {}).get("app", "*")
            peers.add((ns, app))
    return peers


def test_network_policies_let_only_the_right_pods_reach_each_backend(overlay: str, objects: Objects) -> None:
    policies = objects.of_kind("NetworkPolicy")
    ns = "imagestream"
    (deny,) = [p for p in policies if p["metadata"]["name"] == "default-deny-ingress"]
    assert deny["metadata"]["namespace"] == ns and deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    node = ("imagestream-node", "node-agent")
    expected = {  # app: {named port: the peers that may reach it}
        "cassandra": {"cql": {(ns, "cassandra"), (ns, "chunk-store"), (ns, "chunk-store-schema")},
                      "intra-node": {(ns, "cassandra")}},
        "redis": {"redis": {(ns, "zonal-cache")}},
        "chunk-store": {"grpc": {(ns, "zonal-cache"), node, ("*", "*")}},
        "zonal-cache": {"grpc": {node}},
        "zipkin": {"http": {(ns, "chunk-store"), (ns, "zonal-cache"), node}},
    }
    for app, ports in expected.items():
        workloads = objects.by_app(app)
        assert workloads, app
        for workload in workloads:
            assert workload.namespace == ns
            selecting = [p for p in policies if p["metadata"]["namespace"] == ns and p is not deny
                         and _selects(p["spec"]["podSelector"], workload.labels)]
            assert len(selecting) == 1, (workload.name, [p["metadata"]["name"] for p in selecting])
            (policy,) = selecting
            for port, peers in ports.items():
                assert container_port(workload.containers(init=False)[0], port), (app, port)
                assert _allowed_peers(policy, port) == peers, (app, port, _allowed_peers(policy, port))
    # the chunk store's open door is for pushers only: pods labelled so
    (store_policy,) = [p for p in policies if p["metadata"]["name"] == "chunk-store"]
    anywhere = [peer for rule in store_policy["spec"]["ingress"] for peer in rule["from"]
                if peer.get("namespaceSelector") == {}]
    assert anywhere == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"imagestream.io/pusher": "true"}}}]
    # the pods each policy names as peers exist with those labels
    apps = {w.app for w in objects.workloads()} | {Workload(j).app for j in objects.of_kind("Job")}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                app = peer.get("podSelector", {}).get("matchLabels", {}).get("app")
                assert app is None or app in apps, (policy["metadata"]["name"], app)


def test_node_cache_memory_is_the_reservation_plus_the_documented_overhead(overlay: str, objects: Objects) -> None:
    (agent,) = [Workload(d) for d in objects.of_kind("DaemonSet")]
    overhead = annotation(agent.obj, OVERHEAD_ANNOTATION)
    assert overhead, f"the DaemonSet documents its overhead in {OVERHEAD_ANNOTATION}"
    (node_cache,) = [c for c in agent.containers() if dockerfile.python_module(argv(c)) == "node_cache"]
    reservation = config.parse_size(objects.env(agent, node_cache)["IMAGESTREAM_NODE_MEMORY_BYTES"])
    resources = node_cache["resources"]
    expected = reservation + quantity(overhead)
    assert quantity(resources["requests"]["memory"]) == quantity(resources["limits"]["memory"]) == expected


# -- security ----------------------------------------------------------------------------------------

def test_restricted_namespaces_hold_only_restricted_pods(overlay: str, objects: Objects) -> None:
    """What Pod Security 'restricted' admits, so that the namespace label does not reject our own pods."""
    restricted = {n["metadata"]["name"] for n in objects.of_kind("Namespace")
                  if n["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted"}
    assert restricted
    for workload in objects.workloads():
        if workload.namespace not in restricted:
            continue
        pod = workload.pod
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), workload.name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), workload.name
        for container in workload.containers():
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            where = f"{workload.name}/{container['name']}"
            assert context.get("runAsNonRoot") is True and context.get("runAsUser", 1) != 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            assert not context.get("capabilities", {}).get("add"), where
            assert not context.get("privileged"), where
            assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def test_node_agent_can_mount_fuse_on_the_node(overlay: str, objects: Objects) -> None:
    (agent,) = [Workload(d) for d in objects.of_kind("DaemonSet")]
    namespace = objects.get("Namespace", agent.namespace)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {"operator": "Exists"} in agent.pod["tolerations"], "runs on every node"
    privileged = [c for c in agent.containers() if c.get("securityContext", {}).get("privileged")]
    # the one that mounts (FUSE), and the snapshotter (it unpacks layers: owners, devices)
    assert sorted(c["name"] for c in privileged) == ["fuse-client", "snapshotter"]
    (mounter,) = [c for c in privileged if c["name"] == "fuse-client"]
    (snapshotter,) = [c for c in privileged if c["name"] == "snapshotter"]
    by_path = {m["mountPath"]: m for m in mounter["volumeMounts"]}
    assert agent.volume(by_path["/dev/fuse"]["name"])["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    shared = [m for m in mounter["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"]
    assert shared and all("hostPath" in agent.volume(m["name"]) for m in shared)
    # the node's FUSE client unmounts on SIGTERM, and a new one removes what a killed one left (tests/fuse)
    assert mounter["args"] == ["python", "-m", "fuse_client"], "the mounter is the node's FUSE client"
    # the snapshotter reads the pod of a container from the node's containerd, read-only
    assert argv(snapshotter)[-3:] == ["-m", "snapshotter", "--kube-events"]
    snap_paths = {m["mountPath"]: m for m in snapshotter["volumeMounts"]}
    containerd = snap_paths["/run/containerd"]
    assert containerd.get("readOnly") and agent.volume(containerd["name"])["hostPath"]["path"] == "/run/containerd"
    env = {e["name"]: e.get("value") for e in snapshotter["env"]}
    assert env["IMAGESTREAM_CONTAINERD_SOCKET"].startswith("/run/containerd/")
    assert env["IMAGESTREAM_SNAPSHOTTER_SOCKET"].startswith(snap_paths["/run/imagestream"]["mountPath"])
    for other in agent.containers():
        if other not in privileged:
            context = other.get("securityContext", {})
            assert context.get("capabilities", {}).get("drop") == ["ALL"], other["name"]
            assert context.get("allowPrivilegeEscalation") is False, other["name"]


# -- Cassandra and the zones -------------------------------------------------------------------------

def test_cassandra_racks_data_centre_and_replication_agree(overlay: str, objects: Objects) -> None:
    from chunk_store.schema import parse_replication
    from imagestream_dev.stack.cassandra import CASSANDRA_VERSION

    statefulset = Workload(objects.get("StatefulSet", "cassandra"))
    (configmap,) = [c for c in objects.of_kind("ConfigMap") if c["metadata"]["name"].startswith("cassandra")]
    dc, replication = configmap["data"]["datacenter"], configmap["data"]["replication"]
    factors = parse_replication(replication)
    assert set(factors) == {dc}, "the keyspace is replicated in the data centre the nodes are in"
    assert factors[dc] <= statefulset.obj["spec"]["replicas"]
    (chunk_store,) = objects.by_app("chunk-store")
    env = objects.env(chunk_store, chunk_store.container("chunk-store"))
    assert env["IMAGESTREAM_CASSANDRA_LOCAL_DC"] == dc
    schema_job = objects.get("Job", "chunk-store-schema")
    (schema_step,) = schema_job["spec"]["template"]["spec"]["containers"]
    assert objects.env(Workload(schema_job), schema_step)["IMAGESTREAM_CASSANDRA_REPLICATION"] == replication
    assert objects.env(statefulset, statefulset.container("configure"))["CASSANDRA_DC"] == dc
    for container in statefulset.containers():
        assert container["image"] == f"cassandra:{CASSANDRA_VERSION}", "the local stack's release"
    cassandra = statefulset.container("cassandra")
    cassandra_env = objects.env(statefulset, cassandra)
    heap = quantity(cassandra_env["MAX_HEAP_SIZE"].replace("G", "Gi").replace("M", "Mi"))
    assert quantity(cassandra["resources"]["limits"]["memory"]) >= heap + (256 << 20), "room beyond the heap"
    assert cassandra["readinessProbe"]["tcpSocket"]["port"] == "cql", "ready when it serves CQL"
    (data,) = statefulset.obj["spec"]["volumeClaimTemplates"]
    assert {"name": data["metadata"]["name"], "mountPath": "/var/lib/cassandra"} in cassandra["volumeMounts"]
    for seed in config.parse_list(cassandra_env["CASSANDRA_SEEDS"]):
        pod, service = seed.split(".")[:2]
        assert service == statefulset.obj["spec"]["serviceName"]
        assert int(pod.removeprefix("cassandra-")) < statefulset.obj["spec"]["replicas"]
    headless = objects.get("Service", statefulset.obj["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    (spread,) = [t for t in statefulset.pod["topologySpreadConstraints"] if t["topologyKey"] == NODE_ZONE]
    zones = {w.labels[ZONE_LABEL] for w in objects.workloads() if ZONE_LABEL in w.labels}
    if len(zones) > 1:  # a rack per zone, one node per rack, every chunk in every zone
        assert spread["whenUnsatisfiable"] == "DoNotSchedule" and spread["minDomains"] == len(zones)
        assert statefulset.obj["spec"]["replicas"] == factors[dc] == len(zones)


def test_each_zone_has_its_redis_and_zonal_cache_pinned_to_it(overlay: str, objects: Objects) -> None:
    zonal = objects.by_app("redis") + objects.by_app("zonal-cache")
    zones = {w.labels.get(ZONE_LABEL) for w in zonal}
    for zone in zones:
        in_zone = [w for w in zonal if w.labels.get(ZONE_LABEL) == zone]
        assert sorted(w.app for w in in_zone) == ["redis", "zonal-cache"], zone
        for workload in in_zone:
            assert workload.pod.get("nodeSelector", {}).get(NODE_ZONE) == zone, workload.name
    for app in ("redis", "zonal-cache"):
        service = objects.get("Service", app)
        assert service["spec"]["trafficDistribution"] == "PreferClose", "a zone's callers stay in the zone"
        assert ZONE_LABEL not in service["spec"]["selector"], "one Service across the zones"


def test_regional_store_survives_a_drain(overlay: str, objects: Objects) -> None:
    (store,) = objects.by_app("chunk-store")
    budgets = [b for b in objects.of_kind("PodDisruptionBudget")
               if b["spec"]["selector"]["matchLabels"].items() <= store.labels.items()]
    assert len(budgets) == 1
    assert budgets[0]["spec"]["maxUnavailable"] == 1
    if overlay != "dev":
        assert store.obj["spec"]["replicas"] >= 3


def test_cassandra_settings_agree_with_the_local_stack(overlay: str, objects: Objects, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The blob limits the chunk store needs are the local stack's (devtools/imagestream_dev/stack/cassandra.py)."""
    from imagestream_dev.stack import cassandra

    script = load_configure_script()
    (configmap,) = [c for c in objects.of_kind("ConfigMap") if c["metadata"]["name"].startswith("cassandra")]
    ours_ = script.settings(configmap["data"]["settings.yaml"])
    local = script.settings(cassandra._yaml(cassandra.CassandraNode("imagestream", tmp_path)))
    heap_derived = {"native_transport_max_request_data_in_flight"}
    shared = (set(ours_) & set(local)) - heap_derived
    assert {"commitlog_segment_size", "max_mutation_size", "native_transport_max_message_size"} <= shared
    assert {k: ours_[k] for k in shared} == {k: local[k] for k in shared}


# -- mutual TLS ---------------------------------------------------------------------------------------------

TLS_PROCESSES = {"chunk_store": "chunk-store", "zonal_cache": "zonal-cache", "node_cache": "node-cache",
                 "fuse_client": "fuse-client", "snapshotter": "snapshotter"}  # Python module -> its identity in the local stack (certs.IDENTITIES)


def certificates() -> dict[tuple[str, str], dict]:
    """k8s/cert-manager's Certificates by (namespace, Secret name)."""
    import subprocess

    import yaml

    from tests.deploy.tilt import kubectl

    result = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "cert-manager")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {(d["metadata"]["namespace"], d["spec"]["secretName"]): d for d in yaml.safe_load_all(result.stdout)
            if d and d["kind"] == "Certificate"}


def test_every_tier_presents_a_certificate_with_its_role_from_a_mounted_secret(overlay: str, objects: Objects) -> None:
    """Each process of ours that speaks TCP reads its certificate, key and CA from a Secret cert-manager fills
    (k8s/cert-manager), whose URI SANs are the roles the local stack gives the same process."""
    from imagestream import tls
    from imagestream_dev.stack import certs

    issued = certificates()
    servers: dict[str, dict] = {}  # app label -> the Certificate its pods present
    seen = set()
    for workload, container in objects.iter_containers():
        if image_name(container["image"]) not in ours():
            continue
        module = dockerfile.python_module(argv(container))
        if module not in TLS_PROCESSES:
            continue
        env = objects.env(workload, container)
        assert env.get("IMAGESTREAM_TLS", "on") == "on", f"{workload.name}: TLS turned off"
        files = {env.get(f"IMAGESTREAM_TLS_{k}") for k in ("CERT", "KEY", "CA")}
        mounts = [m for m in container.get("volumeMounts", []) if all(f and f.startswith(m["mountPath"] + "/")
                                                                     for f in files)]
        assert mounts, f"{workload.name}/{container['name']}: its certificate is not in a mounted volume ({files})"
        secret = workload.volume(mounts[0]["name"])["secret"]["secretName"]
        assert {f.rsplit("/", 1)[1] for f in files} == {"tls.crt", "tls.key", "ca.crt"}  # cert-manager's keys
        certificate = issued.get((workload.namespace, secret))
        assert certificate, f"{workload.name}: no Certificate in k8s/cert-manager fills {workload.namespace}/{secret}"
        roles = {u.removeprefix(tls.ROLE_URI) for u in certificate["spec"].get("uris", [])}
        assert roles == set(certs.IDENTITIES[TLS_PROCESSES[module]]), (workload.name, roles)
        assert certificate["spec"]["issuerRef"]["name"] == "imagestream-ca"
        servers[workload.app] = certificate
        seen.add(module)
    assert seen == set(TLS_PROCESSES)
    pusher = [c for c in issued.values() if c["spec"]["commonName"] == "pusher"]  # the operators' `imagestream push`
    assert [c["spec"]["uris"] for c in pusher] == [[tls.ROLE_URI + "pusher"]]
    # every address a tier dials is a name in the certificate the server behind it presents
    for workload, container in objects.iter_containers():
        env = objects.env(workload, container)
        for variable in ("IMAGESTREAM_ZONAL_UPSTREAMS", "IMAGESTREAM_NODE_UPSTREAMS", "IMAGESTREAM_REGION"):
            for address in config.parse_list(env.get(variable) or ""):
                host = address.rpartition(":")[0]
                service = objects.service_for_host(host, workload.namespace)
                for backend in objects.selected(service):
                    assert host in servers[backend.app]["spec"]["dnsNames"], (workload.name, variable, host)
    # a TCP tier's probes run the health check in its own pod, which dials its listen address on loopback
    for workload, container in objects.iter_containers():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            tier = command[-1] if command[2:3] == ["imagestream.rpc.healthcheck"] else None
            if tier in ("chunk_store", "zonal_cache"):
                assert "127.0.0.1" in servers[workload.app]["spec"].get("ipAddresses", []), (workload.name, probe)

