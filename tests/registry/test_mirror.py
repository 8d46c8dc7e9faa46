"""Pull-through conversion against real registries (docker-registry 2.8, TLS + htpasswd auth as upstream):
`mirror add` checks its login; the first pull of a never-seen image is served from the upstream (its
manifest as it is, its blobs streamed through) and says so, while the image is converted once; then it
is served streamable, its blobs still proxied. Concurrent first pulls on two regional replicas convert
once; a missing tag, an upstream that dies mid-layer or is down end in a clear error, nothing published."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import run_cli
from tests.registry.conftest import (PASSWORD, USER, CuttingProxy, docker_config, layer, needs_registry, registry_ports,
                                     upload_image)
from tests.registry.test_push_registry import one_line_error, read

pytestmark = [needs_registry]

ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])


def endpoint(address: str | None = None) -> httpx.Client:
    """A client of the regional OCI endpoint with this test's certificate."""
    from imagestream import tls

    address = address or os.environ["IMAGESTREAM_DISTRIBUTION_LISTEN"]
    if not tls.enabled():
        return httpx.Client(base_url=f"http://{address}", timeout=60)
    return httpx.Client(base_url=f"https://{address}", verify=tls.client_ssl_context(), timeout=60)


def metric(name: str, address: str | None = None) -> float:
    address = address or os.environ["IMAGESTREAM_CHUNK_STORE_METRICS"]
    for line in httpx.get(f"http://{address}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def image_states() -> dict[str, str]:
    """NAME -> STATE column of `imagestream images`."""
    lines = run_cli("images").stdout.splitlines()
    column = lines[0].index("STATE")
    return {line.split()[0]: line[column:].strip() for line in lines[1:]}


def wait_for_state(name: str, prefix: str, timeout: float = 180) -> list[str]:
    """Poll `imagestream images` until NAME's state starts with `prefix`; returns every state seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        state = image_states().get(name, "")
        if not seen or seen[-1] != state:
            seen.append(state)
        if state.startswith(prefix):
            return seen
        assert time.monotonic() < deadline, f"{name}: states {seen}, never {prefix!r}"
        time.sleep(0.5)


def small_image(client: httpx.Client, repository: str, tag: str, files: dict[str, bytes]) -> tuple[dict, bytes]:
    """Upload a one-layer image; returns its manifest (as the registry holds it) and its layer blob."""
    blob, diff_id = layer(files, "gzip")
    upload_image(client, repository, [(blob, diff_id, "application/vnd.oci.image.layer.v1.tar+gzip")], "amd64",
                 tag=tag)
    manifest = client.get(f"/v2/{repository}/manifests/{tag}", headers={"Accept": ACCEPT}).json()
    return manifest, blob


def test_mirror_add_takes_only_an_upstream_it_can_log_in_to(stack, registries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, ca = registries["secure"], str(registries["ca"])
    bad = {"DOCKER_CONFIG": str(docker_config(tmp_path / "bad", registry.address, USER, "not-the-password"))}
    line = one_line_error(run_cli("mirror", "add", "--repository", "badlogin", "--ca-file", ca, registry.address,
                                  env=bad, check=False))
    assert "unauthorized: the registry refused" in line, line
    line = one_line_error(run_cli("mirror", "add", "--repository", "nologin", "--ca-file", ca, registry.address,
                                  env={"DOCKER_CONFIG": str(tmp_path / "none")}, check=False))
    assert "asks for a login" in line, line
    down = f"127.0.0.1:{registry_ports()[0] + 9}"  # nothing listens there
    line = one_line_error(run_cli("mirror", "add", "--repository", "down", "--plain-http", down, check=False))
    assert "cannot connect" in line, line
    listed = run_cli("mirror", "ls").stdout
    assert "badlogin" not in listed and "nologin" not in listed and "down " not in listed, listed
    # a pusher certificate is needed to add one: a node's is refused
    from imagestream import tls

    if tls.enabled():
        node = {"IMAGESTREAM_TLS_CERT": str(tls.tls_dir() / "node-cache.crt"),
                "IMAGESTREAM_TLS_KEY": str(tls.tls_dir() / "node-cache.key")}
        line = one_line_error(run_cli("mirror", "add", "--plain-http", registries["plain"].address, env=node,
                                      check=False))
        assert "AddMirror" in line and "pusher" in line, line


def test_first_pull_falls_back_then_the_image_streams(mirrored_upstream) -> None:  # type: ignore[no-untyped-def]
    files = {"etc/greeting": b"hello from upstream\n", "data/blob": os.urandom(1 << 20)}
    with mirrored_upstream.client((USER, PASSWORD)) as client:
        original, layer_blob = small_image(client, "team/web", "v1", files)
        original_bytes = client.get("/v2/team/web/manifests/v1", headers={"Accept": ACCEPT}).content
    fallbacks = metric("imagestream_mirror_fallback_pulls_total")
    published = metric('imagestream_mirror_conversions_total{outcome="published"}')
    with endpoint() as regional:
        first = regional.get("/v2/hub/team/web/manifests/v1", headers={"Accept": ACCEPT})
        assert first.status_code == 200, first.text
        # a normal pull: the upstream's manifest as it is, and the endpoint says so
        assert first.headers["X-Imagestream-Mirror"] == "fallback; converting"
        assert first.content == original_bytes
        assert first.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(original_bytes).hexdigest()
        blob = regional.get(f"/v2/hub/team/web/blobs/{original['layers'][0]['digest']}")
        assert blob.status_code == 200 and blob.content == layer_blob
        assert blob.headers["X-Imagestream-Mirror"] == "proxied"
        assert metric("imagestream_mirror_fallback_pulls_total") == fallbacks + 1

        states = wait_for_state("hub/team/web:v1", "ready")
        assert all(s.startswith(("converting", "ready")) for s in states if s), states
        assert metric('imagestream_mirror_conversions_total{outcome="published"}') == published + 1

        # converted: served like a pushed image, streamable; the upstream's blobs still proxied, not copied
        after = regional.get("/v2/hub/team/web/manifests/v1", headers={"Accept": ACCEPT})
        assert after.status_code == 200 and "X-Imagestream-Mirror" not in after.headers
        served = after.json()
        assert [x["digest"] for x in served["layers"]] == [x["digest"] for x in original["layers"]]
        labels = served["layers"][0]["annotations"]
        assert labels["containerd.io/snapshot/imagestream.image"] == "hub/team/web:v1"
        again = regional.get(f"/v2/hub/team/web/blobs/{original['layers'][0]['digest']}")
        assert again.content == layer_blob and again.headers["X-Imagestream-Mirror"] == "proxied"
    assert read("hub/team/web:v1", "/etc/greeting") == b"hello from upstream\n"
    assert read("hub/team/web:v1", "/data/blob") == files["data/blob"]


def _second_replica(tmp_path: pathlib.Path) -> tuple[subprocess.Popen, str, str, pathlib.Path]:
    """Another regional chunk store on the same Cassandra keyspace (as a second replica of the regional
    tier runs), with its own gRPC, OCI and metrics ports."""
    from imagestream_dev.stack.local import services_path

    base = registry_ports()[0] + 6
    grpc_, oci, metrics = (f"127.0.0.1:{base + i}" for i in range(3))
    log = tmp_path / "replica2.log"
    env = {**os.environ, "PYTHONPATH": services_path(), "OTEL_SERVICE_NAME": "chunk_store",
           "IMAGESTREAM_CHUNK_STORE_LISTEN": grpc_, "IMAGESTREAM_DISTRIBUTION_LISTEN": oci,
           "IMAGESTREAM_CHUNK_STORE_METRICS": metrics}
    from imagestream import tls

    if tls.enabled():  # the stack's chunk store certificate names 127.0.0.1
        env |= {"IMAGESTREAM_TLS_CERT": str(tls.tls_dir() / "chunk-store.crt"),
                "IMAGESTREAM_TLS_KEY": str(tls.tls_dir() / "chunk-store.key")}
    process = subprocess.Popen([sys.executable, "-m", "chunk_store"], env=env, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            with endpoint(oci) as c:
                if c.get("/v2/").status_code == 200:
                    return process, oci, metrics, log
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_concurrent_first_pulls_on_two_replicas_convert_once(mirrored_upstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with mirrored_upstream.client((USER, PASSWORD)) as client:
        small_image(client, "team/web", "v2", {"etc/greeting": b"v2\n", "data/more": os.urandom(2 << 20)})
    process, oci2, metrics2, log2 = _second_replica(tmp_path)
    try:
        published = (metric('imagestream_mirror_conversions_total{outcome="published"}'),
                     metric('imagestream_mirror_conversions_total{outcome="published"}', metrics2))

        def pull(i: int) -> str:
            with endpoint(None if i % 2 else oci2) as regional:
                r = regional.get("/v2/hub/team/web/manifests/v2", headers={"Accept": ACCEPT})
                assert r.status_code == 200, r.text
                # a request that comes after the conversion published the name is served streamable
                return r.headers.get("X-Imagestream-Mirror", "converted")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            headers = list(pool.map(pull, range(16)))
        assert headers.count("fallback; converting") >= 1, headers
        assert all(h.startswith("fallback") or h == "converted" for h in headers), headers
        wait_for_state("hub/team/web:v2", "ready")
        time.sleep(1)
        ended = (metric('imagestream_mirror_conversions_total{outcome="published"}') - published[0]) + \
            (metric('imagestream_mirror_conversions_total{outcome="published"}', metrics2) - published[1])
        assert ended == 1  # one conversion in all, on one of the two replicas
        assert metric('imagestream_mirror_conversions_total{outcome="failed"}', metrics2) == 0
        assert read("hub/team/web:v2", "/etc/greeting") == b"v2\n"
    finally:
        process.terminate()
        process.wait(30)
    starts = log2.read_text().count("mirror: converting hub/team/web:v2 from")
    main_log = pathlib.Path(os.environ["IMAGESTREAM_HOME"]) / "logs" / "chunk_store.log"
    starts += main_log.read_text().count("mirror: converting hub/team/web:v2 from") if main_log.exists() else 0
    assert starts == 1


def test_a_missing_tag_is_404_and_converts_nothing(mirrored_upstream) -> None:  # type: ignore[no-untyped-def]
    with endpoint() as regional:
        r = regional.get("/v2/hub/team/web/manifests/no-such-tag", headers={"Accept": ACCEPT})
    assert r.status_code == 404
    error = r.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "no such manifest" in error["message"], error
    assert "hub/team/web:no-such-tag" not in image_states()


def test_an_upstream_that_dies_mid_layer_or_is_down(stack, registries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry = registries["plain"]
    with registry.client(None) as client:
        small_image(client, "team/cut", "v1", {"data/big": os.urandom(3 << 20)})
        original = client.get("/v2/team/cut/manifests/v1", headers={"Accept": ACCEPT}).json()
    # manifests and config pass; the 3 MiB layer does not
    proxy = CuttingProxy(registry.address, limit=1 << 20, port=registry_ports()[0] + 5)
    try:
        run_cli("mirror", "add", "--repository", "cut", "--plain-http", proxy.address)
        failed = metric('imagestream_mirror_conversions_total{outcome="failed"}')
        with endpoint() as regional:
            first = regional.get("/v2/cut/team/cut/manifests/v1", headers={"Accept": ACCEPT})
            assert first.status_code == 200 and first.headers["X-Imagestream-Mirror"].startswith("fallback")
            # the proxied layer is cut too: the client sees a short read, never a whole blob
            with pytest.raises(httpx.HTTPError):
                regional.get(f"/v2/cut/team/cut/blobs/{original['layers'][0]['digest']}")
        states = wait_for_state("cut/team/cut:v1", "failed")
        assert "connection lost after" in states[-1] or "ended after" in states[-1], states
        assert proxy.cut >= 2
        assert metric('imagestream_mirror_conversions_total{outcome="failed"}') == failed + 1
        # nothing published: no name (a published one would be "ready"), and a pull still falls back
        assert image_states()["cut/team/cut:v1"].startswith("failed: ")
        with endpoint() as regional:
            again = regional.get("/v2/cut/team/cut/manifests/v1", headers={"Accept": ACCEPT})
            assert again.headers["X-Imagestream-Mirror"].startswith("fallback; failed: ")
    finally:
        proxy.close()
    # the upstream is down: the pull gets an error naming it
    with endpoint() as regional:
        down = regional.get("/v2/cut/team/cut/manifests/v1", headers={"Accept": ACCEPT})
    assert down.status_code == 503
    assert "cannot connect" in down.json()["errors"][0]["message"], down.text
    run_cli("mirror", "rm", "cut")
    assert "cut " not in run_cli("mirror", "ls").stdout
