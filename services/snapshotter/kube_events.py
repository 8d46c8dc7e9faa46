"""UNTESTED (no Kubernetes here): post an `ImageStreaming` event when an image is streamed on this node.

Behind `python -m snapshotter --kube-events`. Uses the pod's service account
(in-cluster token and CA) and the node name from NODE_NAME (downward API), and
posts a core/v1 Event whose involvedObject is the Node, with reason
ImageStreaming, as GKE shows one. An event on the *pod* needs the pod's name,
which a snapshotter is not given: see docs/containerd.md for how it can be found
(containerd's container labels io.kubernetes.pod.name / .namespace).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import threading
import urllib.request
from collections.abc import Callable

log = logging.getLogger("snapshotter")

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeEvents:
    def __init__(self, api: str, token: str, ca_file: str, node: str, namespace: str = "default") -> None:
        self.api, self.token, self.node, self.namespace = api, token, node, namespace
        self.context = ssl.create_default_context(cafile=ca_file)

    @classmethod
    def in_cluster(cls) -> KubeEvents:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        with open(f"{SA}/token") as f:
            token = f.read().strip()
        return cls(f"https://{host}:{port}", token, f"{SA}/ca.crt", os.environ["NODE_NAME"])

    def post(self, image: str, seconds: float) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": "imagestream-", "namespace": self.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node},
            "reason": "ImageStreaming", "type": "Normal",
            "message": f"Image {image} is backed by image streaming (mounted in {seconds:.2f} s)",
            "source": {"component": "imagestream-snapshotter", "host": self.node},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        request = urllib.request.Request(
            f"{self.api}/api/v1/namespaces/{self.namespace}/events", data=json.dumps(event).encode(), method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=5):
                pass
        except OSError as e:
            log.warning("could not post the ImageStreaming event: %s", e)

    def wrap(self, on_mount: Callable) -> Callable:  # type: ignore[type-arg]
        def both(layer, seconds: float) -> None:  # type: ignore[no-untyped-def]
            on_mount(layer, seconds)
            threading.Thread(target=self.post, args=(layer.image, seconds), daemon=True).start()

        return both
