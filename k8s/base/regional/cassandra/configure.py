"""Init container of the Cassandra StatefulSet: this node's configuration, written before Cassandra starts.

It runs in the Cassandra image itself (python3 is there for cqlsh), as the cassandra user:

1. copies the image's configuration (/etc/cassandra) into CONFIG, the emptyDir the Cassandra container
   mounts on /etc/cassandra (the image's entrypoint then applies the CASSANDRA_* variables to it);
2. sets the cassandra.yaml settings of SETTINGS ("key: value" lines, from the ConfigMap `cassandra`);
3. writes cassandra-rackdc.properties: dc = CASSANDRA_DC, rack = the zone of the node this pod runs on
   (its topology.kubernetes.io/zone label, read from the Kubernetes API with the pod's service
   account), so that NetworkTopologyStrategy keeps a chunk's replicas in different zones. A node
   without the label (a one-zone dev cluster) gives DEFAULT_RACK;
4. writes JMX's password and access files (0600) for user `nodetool` from the Secret's jmx-password:
   JMX listens on the pod's loopback only and asks for that login (JVM_EXTRA_OPTS of the container).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import urllib.request

IMAGE_CONFIG = "/etc/cassandra"
CONFIG = "/config"
SETTINGS = "/scripts/settings.yaml"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
JMX_SECRET = "/secrets/cassandra/jmx-password"
JMX_USER = "nodetool"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_RACK = "rack1"


def settings(text: str) -> dict[str, str]:
    """The `key: value` lines of a flat YAML file (comments and blank lines skipped)."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(":")
            found[key.strip()] = value.strip()
    return found


def set_setting(yaml_text: str, key: str, value: str) -> str:
    """Set a top-level cassandra.yaml key: replace its line, else uncomment its example, else append."""
    for pattern in (rf"^{re.escape(key)}:.*$", rf"^#\s*{re.escape(key)}:.*$"):
        if re.search(pattern, yaml_text, flags=re.M):
            return re.sub(pattern, f"{key}: {value}", yaml_text, count=1, flags=re.M)
    return yaml_text.rstrip("\n") + f"\n{key}: {value}\n"


def node_labels(node: str) -> dict[str, str]:
    context = ssl.create_default_context(cafile=f"{SERVICE_ACCOUNT}/ca.crt")
    with open(f"{SERVICE_ACCOUNT}/token") as f:
        token = f.read().strip()
    request = urllib.request.Request(f"https://kubernetes.default.svc/api/v1/nodes/{node}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as reply:
        return json.load(reply)["metadata"].get("labels", {})


def rack(labels: dict[str, str]) -> str:
    return labels.get(ZONE_LABEL) or DEFAULT_RACK


def main() -> None:
    # the files and folders inside, not the mount point's own mode and times: CONFIG is an emptyDir this
    # user does not own, and setting them fails with EPERM
    os.makedirs(CONFIG, exist_ok=True)
    for entry in os.scandir(IMAGE_CONFIG):
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, os.path.join(CONFIG, entry.name), dirs_exist_ok=True)
        else:
            shutil.copy(entry.path, CONFIG)
    path = os.path.join(CONFIG, "cassandra.yaml")
    with open(path) as f:
        text = f.read()
    with open(SETTINGS) as f:
        for key, value in settings(f.read()).items():
            text = set_setting(text, key, value)
    with open(path, "w") as f:
        f.write(text)
    dc, node_rack = os.environ["CASSANDRA_DC"], rack(node_labels(os.environ["NODE_NAME"]))
    with open(os.path.join(CONFIG, "cassandra-rackdc.properties"), "w") as f:
        f.write(f"dc={dc}\nrack={node_rack}\nprefer_local=true\n")
    with open(JMX_SECRET) as f:
        jmx_password = f.read().strip()
    for name, text in (("jmxremote.password", f"{JMX_USER} {jmx_password}\n"), ("jmxremote.access", f"{JMX_USER} readwrite\n")):
        fd = os.open(os.path.join(CONFIG, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    print(f"cassandra configured: dc={dc} rack={node_rack}")


if __name__ == "__main__":
    main()
