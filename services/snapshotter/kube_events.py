"""The ImageStreaming Kubernetes event, posted on the pod, as GKE shows it.

Behind `python -m snapshotter --kube-events` (the node agent's DaemonSet). When a container's
snapshot is prepared on a streamed image, the snapshotter finds the container's pod and posts a
core/v1 Event with reason ImageStreaming whose involvedObject is that pod.

A snapshotter is not told the pod. containerd hands a proxy snapshotter the key
`<containerd namespace>/<n>/<container id>`, and the CRI plugin creates the container record, labelled
io.kubernetes.pod.name / .namespace / .uid, just after its snapshot is prepared: so the container is
looked up in containerd's Containers API until it appears. Credentials are the pod's service account
(RBAC: create events, k8s/base/node/rbac.yaml); the node name comes from K8S_NODE_NAME (downward
API; the same variable names the node in the traces' resource attributes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import ssl
import threading
import time
import urllib.request

import grpc

log = logging.getLogger("snapshotter")

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
REASON = "ImageStreaming"


@dataclasses.dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str


def container_of(key: str) -> tuple[str, str] | None:
    """(containerd namespace, container id) of a snapshot key containerd gave a proxy snapshotter."""
    parts = key.split("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[2]


def find_pod(containerd_socket: str, key: str, timeout_s: float = 15.0) -> Pod | None:
    """The pod of the container whose snapshot is `key`; None if it is no Kubernetes container (or never
    shows up in time)."""
    from containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc

    found = container_of(key)
    if found is None:
        return None
    namespace, container_id = found
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel("unix:" + containerd_socket) as channel:
        stub = containers_pb2_grpc.ContainersStub(channel)
        while True:
            try:
                reply = stub.Get(containers_pb2.GetContainerRequest(id=container_id),
                                 metadata=[("containerd-namespace", namespace)], timeout=5)
                break
            except grpc.RpcError as e:
                # NOT_FOUND: its snapshot is prepared, the record not written yet
                if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    log.warning("no pod for snapshot %s: container %s: %s", key, container_id, e.details())
                    return None
            time.sleep(0.1)
    labels = reply.container.labels
    if LABEL_POD_NAME not in labels or LABEL_POD_NAMESPACE not in labels:
        return None
    return Pod(labels[LABEL_POD_NAMESPACE], labels[LABEL_POD_NAME], labels.get(LABEL_POD_UID, ""))


class KubeEvents:
    def __init__(self, api: str, token_file: str, ca_file: str | None, node: str, containerd_socket: str) -> None:
        self.api, self.token_file, self.node, self.containerd_socket = api, token_file, node, containerd_socket
        self.context = ssl.create_default_context(cafile=ca_file) if api.startswith("https:") else None

    @classmethod
    def in_cluster(cls, containerd_socket: str) -> KubeEvents:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", f"{SA}/token", f"{SA}/ca.crt", os.environ["K8S_NODE_NAME"], containerd_socket)

    def event(self, pod: Pod, image: str) -> dict:  # type: ignore[type-arg]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name,
                               "uid": pod.uid},
            "reason": REASON, "type": "Normal",
            "message": f"Image {image} is backed by image streaming.",
            "source": {"component": "imagestream-snapshotter", "host": self.node},
            "reportingComponent": "imagestream.dev/snapshotter", "reportingInstance": self.node,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }

    def post(self, pod: Pod, image: str) -> bool:
        with open(self.token_file) as f:  # read each time: projected tokens are rotated
            token = f.read().strip()
        request = urllib.request.Request(
            f"{self.api}/api/v1/namespaces/{pod.namespace}/events", data=json.dumps(self.event(pod, image)).encode(),
            method="POST", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=5):
                pass
        except OSError as e:
            log.warning("could not post the ImageStreaming event on pod %s/%s: %s", pod.namespace, pod.name, e)
            return False
        log.info("ImageStreaming event posted on pod %s/%s (%s)", pod.namespace, pod.name, image)
        return True

    def container_started(self, key: str, image: str) -> threading.Thread:
        """A container's snapshot `key` was prepared on the streamed `image`: post the event on its pod, off
        the snapshotter's event loop (the container record appears only after Prepare returns)."""
        def run() -> None:
            pod = find_pod(self.containerd_socket, key)
            if pod is not None:
                self.post(pod, image)

        thread = threading.Thread(target=run, name="kube-event", daemon=True)
        thread.start()
        return thread
