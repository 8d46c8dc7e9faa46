"""The ImageStreaming event lands on the pod: the pod found through containerd's Containers API (fake,
on a Unix socket), the event posted to the API server (fake, plain HTTP). The real cluster's test is in
tests/cluster/."""

from __future__ import annotations

import http.server
import json
import pathlib
import tempfile
import threading
import time
from concurrent import futures

import grpc
import pytest

from containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from snapshotter import kube_events

POD_LABELS = {"io.kubernetes.pod.name": "app-7f9c", "io.kubernetes.pod.namespace": "shop",
              "io.kubernetes.pod.uid": "0b5e7c1e-uid", "io.kubernetes.container.name": "app"}


class Containers(containers_pb2_grpc.ContainersServicer):
    """containerd's Containers.Get; a container shows up `delay` seconds after the test starts, as the CRI
    plugin writes the record only after the snapshot is prepared."""

    def __init__(self, delay: float) -> None:
        self.ready_at = time.monotonic() + delay
        self.asked: list[tuple[str, str]] = []

    def Get(self, request, context):  # type: ignore[no-untyped-def]
        namespace = dict(context.invocation_metadata()).get("containerd-namespace", "")
        self.asked.append((namespace, request.id))
        if namespace != "k8s.io" or request.id not in ("c0ffee", "plain") or time.monotonic() < self.ready_at:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.id!r} in namespace {namespace!r}: not found")
        labels = POD_LABELS if request.id == "c0ffee" else {}
        return containers_pb2.GetContainerResponse(container=containers_pb2.Container(id=request.id, labels=labels))


@pytest.fixture
def containerd():  # type: ignore[no-untyped-def]
    sock = pathlib.Path(tempfile.mkdtemp(prefix="kube-events-")) / "containerd.sock"
    servicer = Containers(delay=0.5)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    containers_pb2_grpc.add_ContainersServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    yield str(sock), servicer
    server.stop(None)


@pytest.fixture
def api_server():  # type: ignore[no-untyped-def]
    posted: list[tuple[str, str, dict]] = []  # type: ignore[type-arg]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posted.append((self.path, self.headers["Authorization"], body))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", posted
    server.shutdown()


def test_snapshot_key_names_the_container() -> None:
    assert kube_events.container_of("k8s.io/42/c0ffee") == ("k8s.io", "c0ffee")
    assert kube_events.container_of("default/7/a/b") == ("default", "a/b")
    for key in ("c0ffee", "k8s.io/c0ffee", "k8s.io/x/c0ffee", "/1/c", "k8s.io/1/"):
        assert kube_events.container_of(key) is None, key


def test_event_is_posted_on_the_pod_once_its_container_exists(containerd, api_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock, servicer = containerd
    api, posted = api_server
    token = tmp_path / "token"
    token.write_text("sekret\n")
    events = kube_events.KubeEvents(api, str(token), None, "node-1", sock)
    events.container_started("k8s.io/42/c0ffee", "127.0.0.1:5000/shop/app:1").join(10)
    assert len(servicer.asked) > 1  # asked again while the container record did not exist yet
    assert set(servicer.asked) == {("k8s.io", "c0ffee")}
    [(path, auth, event)] = posted
    assert path == "/api/v1/namespaces/shop/events"
    assert auth == "Bearer sekret"
    assert event["reason"] == "ImageStreaming"
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "app-7f9c",
                                       "uid": "0b5e7c1e-uid"}
    assert event["metadata"]["namespace"] == "shop"
    assert "127.0.0.1:5000/shop/app:1" in event["message"]
    assert event["source"]["host"] == "node-1"


def test_no_event_for_containers_outside_kubernetes(containerd, api_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock, _ = containerd
    api, posted = api_server
    (tmp_path / "token").write_text("t")
    events = kube_events.KubeEvents(api, str(tmp_path / "token"), None, "node-1", sock)
    events.container_started("k8s.io/3/plain", "img").join(10)  # no pod labels (ctr run)
    events.container_started("default/3/gone", "img")  # never appears: gives up, posts nothing
    assert kube_events.find_pod(sock, "default/3/gone", timeout_s=0.3) is None
    assert posted == []
