"""k8s/base/regional/cassandra/configure.py, the Cassandra pods' init container, run here on sample files."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from tests.deploy.manifests import load_configure_script

IMAGE_YAML = """\
cluster_name: 'Test Cluster'
# Example: max_mutation_size: 16MiB is half the segment size
#max_mutation_size: 16MiB
# native_transport_max_frame_size: 16MiB
native_transport_max_frame_size: 16MiB
commitlog_segment_size: 32MiB
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:7000"
"""


@pytest.fixture
def script():  # type: ignore[no-untyped-def]
    return load_configure_script()


def test_settings_replace_uncomment_or_append(script) -> None:  # type: ignore[no-untyped-def]
    text = IMAGE_YAML
    for key, value in {"commitlog_segment_size": "64MiB", "max_mutation_size": "32MiB",
                       "native_transport_max_frame_size": "64MiB", "storage_compatibility_mode": "NONE"}.items():
        text = script.set_setting(text, key, value)
    parsed = yaml.safe_load(text)
    assert parsed["commitlog_segment_size"] == "64MiB"
    assert parsed["max_mutation_size"] == "32MiB"  # its commented example became the setting
    assert parsed["native_transport_max_frame_size"] == "64MiB"  # the live line, not the comment
    assert "# native_transport_max_frame_size: 16MiB" in text
    assert parsed["storage_compatibility_mode"] == "NONE"  # absent: appended
    assert parsed["seed_provider"][0]["parameters"][0]["seeds"] == "127.0.0.1:7000"  # the rest untouched
    assert text.count("commitlog_segment_size:") == 1


def test_rack_is_the_nodes_zone(script) -> None:  # type: ignore[no-untyped-def]
    assert script.rack({"topology.kubernetes.io/zone": "us-central1-b", "kubernetes.io/os": "linux"}) == "us-central1-b"
    assert script.rack({"kubernetes.io/os": "linux"}) == "rack1"


def test_writes_the_nodes_configuration(script, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    image, config = tmp_path / "etc-cassandra", tmp_path / "config"
    image.mkdir()
    (image / "cassandra.yaml").write_text(IMAGE_YAML)
    (image / "cassandra-rackdc.properties").write_text("dc=dc1\nrack=rack1\n")
    (image / "jvm17-server.options").write_text("-Xss256k\n")
    settings = pathlib.Path(__file__).resolve().parents[2] / "k8s/base/regional/cassandra/settings.yaml"
    asked = []

    def node_labels(node: str) -> dict[str, str]:
        asked.append(node)
        return {"topology.kubernetes.io/zone": "us-central1-c"}

    monkeypatch.setattr(script, "IMAGE_CONFIG", str(image))
    monkeypatch.setattr(script, "CONFIG", str(config))
    monkeypatch.setattr(script, "SETTINGS", str(settings))
    monkeypatch.setattr(script, "node_labels", node_labels)
    (tmp_path / "jmx-password").write_text("s3cret\n")
    monkeypatch.setattr(script, "JMX_SECRET", str(tmp_path / "jmx-password"))
    monkeypatch.setenv("CASSANDRA_DC", "us-central1")
    monkeypatch.setenv("NODE_NAME", "gke-pool-1-abc")
    script.main()
    assert asked == ["gke-pool-1-abc"]
    assert (config / "jvm17-server.options").read_text() == "-Xss256k\n"  # the rest of the image's configuration
    rackdc = (config / "cassandra-rackdc.properties").read_text()
    assert "dc=us-central1\n" in rackdc and "rack=us-central1-c\n" in rackdc
    parsed = yaml.safe_load((config / "cassandra.yaml").read_text())
    for key, value in script.settings(settings.read_text()).items():
        assert str(parsed[key]) == value, key
    assert (image / "cassandra.yaml").read_text() == IMAGE_YAML  # the image's own file is left alone
    assert parsed["authenticator"] == "PasswordAuthenticator" and parsed["authorizer"] == "CassandraAuthorizer"
    # JMX's login, for the user nodetool, in files only Cassandra's user reads
    assert (config / "jmxremote.password").read_text() == "nodetool s3cret\n"
    assert (config / "jmxremote.access").read_text() == "nodetool readwrite\n"
    assert (config / "jmxremote.password").stat().st_mode & 0o777 == 0o600
