"""Real registries for `push REF`: Debian's docker-registry (CNCF distribution 2.8) started by the suite,
one with TLS from a test CA and htpasswd auth on, one on plain HTTP, and images uploaded to them over the
Distribution API as any client would."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time

import httpx
import pytest
import zstandard

from tests.conftest import run_cli
from imagestream.oci import MEDIA_DOCKER_MANIFEST, MEDIA_LAYER, MEDIA_OCI_CONFIG, MEDIA_OCI_IMAGE_INDEX, MEDIA_OCI_MANIFEST

needs_registry = pytest.mark.skipif(shutil.which("docker-registry") is None or shutil.which("openssl") is None,
                                    reason="needs docker-registry and openssl (Debian packages; scripts/bootstrap)")

USER, PASSWORD = "pusher", "s3cret-pass"


def registry_ports() -> tuple[int, int]:
    """The stack's port base + 100: (TLS + basic auth, plain HTTP); + 2 the token-auth registry, + 3 its
    token service; + 4 and + 5 cutting proxies; + 6 to + 8 a second regional replica (test_mirror.py)."""
    base = int(os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100")) + 100
    return base, base + 1


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A test CA and a server certificate it signed for 127.0.0.1 and localhost: (ca.pem, cert, key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=imagestream test CA")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


@dataclasses.dataclass
class Registry:
    address: str
    process: subprocess.Popen
    log: pathlib.Path
    tls: bool
    ca: pathlib.Path | None = None

    def client(self, auth: tuple[str, str] | None) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        return httpx.Client(base_url=f"{'https' if self.tls else 'http'}://{self.address}",
                            verify=verify, auth=auth, timeout=30)


class TokenService:
    """The token service of a registry with token auth (distribution's JWT scheme): checks the basic
    credentials it is given against USER/PASSWORD and answers a token granting what was asked, signed
    (RS256, by openssl) with a key whose certificate the registry trusts."""

    def __init__(self, folder: pathlib.Path, port: int) -> None:
        import http.server

        self.key, self.cert = folder / "token.key", folder / "token.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out", str(self.cert),
                 "-days", "2", "-subj", "/CN=imagestream test token issuer")
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.issued = 0
        self.refused = 0
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

            def do_GET(self) -> None:  # noqa: N802
                import urllib.parse

                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    service.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": service.token(query.get("service", [""])[0],
                                                          query.get("scope", []))}).encode()
                service.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.realm = f"http://127.0.0.1:{port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, audience: str, scopes: list[str]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": "imagestream-test-issuer", "sub": USER, "aud": audience, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = b64(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}).encode()) + "." + \
            b64(json.dumps(claims).encode())
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                                   check=True, capture_output=True).stdout
        return signing_input + "." + b64(signature)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start(folder: pathlib.Path, port: int, tls: tuple[pathlib.Path, pathlib.Path] | None,
           htpasswd: pathlib.Path | None, ca: pathlib.Path | None, token: TokenService | None = None) -> Registry:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["version: 0.1", "log:", "  level: info", "storage:", "  filesystem:",
             f"    rootdirectory: {folder / 'data'}", "  delete:", "    enabled: true",
             "http:", f"  addr: 127.0.0.1:{port}", f"  secret: test-secret-{port}"]
    if tls:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if htpasswd:
        lines += ["auth:", "  htpasswd:", "    realm: imagestream-test", f"    path: {htpasswd}"]
    if token:
        lines += ["auth:", "  token:", f"    realm: {token.realm}", "    service: imagestream-test-registry",
                  "    issuer: imagestream-test-issuer", f"    rootcertbundle: {token.cert}"]
    (folder / "config.yml").write_text("\n".join(lines) + "\n")
    log = folder / "registry.log"
    process = subprocess.Popen(["docker-registry", "serve", str(folder / "config.yml")], stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    registry = Registry(f"127.0.0.1:{port}", process, log, tls is not None, ca)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                with registry.client(None) as c:
                    if c.get("/v2/").status_code in (200, 401):
                        return registry
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry on {port} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.wait()
        raise


def start_registries():  # type: ignore[no-untyped-def]
    """The session's registries (the `registries` fixture of tests/conftest.py, shared by tests/registry and
    tests/containerd): {'secure': TLS with the test CA + htpasswd auth (basic), 'token': TLS + bearer tokens from a token
    service, 'plain': plain HTTP, no auth}"""
    import bcrypt

    folder = pathlib.Path(tempfile.mkdtemp(prefix="imagestream-registry-"))
    ca, cert, key = make_ca(folder)
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    secure_port, plain_port = registry_ports()
    started = []
    token = TokenService(folder, secure_port + 3)
    try:
        started.append(_start(folder / "secure", secure_port, (cert, key), htpasswd, ca))
        started.append(_start(folder / "plain", plain_port, None, None, None))
        started.append(_start(folder / "token", secure_port + 2, (cert, key), None, ca, token))
        yield {"secure": started[0], "plain": started[1], "token": started[2], "token_service": token, "ca": ca}
    finally:
        token.close()
        for r in started:
            r.process.terminate()
            try:
                r.process.wait(10)
            except subprocess.TimeoutExpired:
                r.process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def docker_config(folder: pathlib.Path, registry: str, user: str, password: str) -> pathlib.Path:
    """A DOCKER_CONFIG folder whose config.json logs in to `registry` as docker login writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return folder


# -- images, uploaded as a client would ----------------------------------------------------------

def layer(files: dict[str, bytes], compression: str) -> tuple[bytes, str]:
    """A layer blob of `files` compressed with 'gzip', 'zstd' or 'none', and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    if compression == "gzip":
        blob = gzip.compress(tar_bytes, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(tar_bytes)
    else:
        blob = tar_bytes
    return blob, diff_id


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload_blob(client: httpx.Client, repository: str, data: bytes) -> dict:
    digest = _digest(data)
    if client.head(f"/v2/{repository}/blobs/{digest}").status_code != 200:
        start = client.post(f"/v2/{repository}/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = httpx.URL(start.headers["Location"]).copy_merge_params({"digest": digest})
        done = client.put(location, content=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
    return {"digest": digest, "size": len(data)}


def upload_manifest(client: httpx.Client, repository: str, reference: str, doc: dict) -> dict:
    content = json.dumps(doc).encode()
    r = client.put(f"/v2/{repository}/manifests/{reference}", content=content,
                   headers={"Content-Type": doc["mediaType"]})
    assert r.status_code == 201, r.text
    return {"mediaType": doc["mediaType"], "digest": _digest(content), "size": len(content)}


def upload_image(client: httpx.Client, repository: str, layers: list[tuple[bytes, str, str]], arch: str,
                 docker: bool = False, tag: str | None = None) -> dict:
    """Upload an image of `layers` ((blob, diff_id, media type)); returns its manifest's descriptor."""
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Env": [f"ARCH={arch}"]},
                         "rootfs": {"type": "layers", "diff_ids": [d for _, d, _ in layers]}}).encode()
    config_type = "application/vnd.docker.container.image.v1+json" if docker else MEDIA_OCI_CONFIG
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_DOCKER_MANIFEST if docker else MEDIA_OCI_MANIFEST,
                "config": {"mediaType": config_type, **upload_blob(client, repository, config)},
                "layers": [{"mediaType": t, **upload_blob(client, repository, b)} for b, _, t in layers]}
    return upload_manifest(client, repository, tag or _digest(json.dumps(manifest).encode()), manifest)


DOCKER_GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def upload_multiplatform(client: httpx.Client, repository: str, tag: str, big: bytes) -> dict:
    """An image index of linux/amd64 (a gzip layer and a zstd layer) and linux/arm64/v8 (an uncompressed
    layer and the same zstd layer); /etc/platform says which, /data/big is `big` in both."""
    shared, shared_id = layer({"usr/share/doc/readme": b"shared by both platforms\n"}, "zstd")
    amd_blob, amd_id = layer({"etc/platform": b"amd64\n", "data/big": big}, "gzip")
    arm_blob, arm_id = layer({"etc/platform": b"arm64\n", "data/big": big}, "none")
    amd = upload_image(client, repository, [(amd_blob, amd_id, MEDIA_LAYER["gzip"]),
                                            (shared, shared_id, MEDIA_LAYER["zstd"])], "amd64")
    arm = upload_image(client, repository, [(arm_blob, arm_id, MEDIA_LAYER["none"]),
                                            (shared, shared_id, MEDIA_LAYER["zstd"])], "arm64")
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_IMAGE_INDEX, "manifests": [
        {**amd, "platform": {"os": "linux", "architecture": "amd64"}},
        {**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}
    return upload_manifest(client, repository, tag, index)


class CuttingProxy:
    """A TCP proxy to `upstream` that cuts a connection once it has passed `limit` bytes of answers:
    a registry that dies in the middle of a layer."""

    def __init__(self, upstream: str, limit: int, port: int) -> None:
        self.upstream = upstream
        self.limit = limit
        self.cut = 0
        self.server = socket.create_server(("127.0.0.1", port))  # outside the ephemeral range, like the registries
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        host, port = self.upstream.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))

        def up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        try:
            while data := upstream.recv(65536):
                passed += len(data)
                if passed > self.limit:
                    self.cut += 1
                    client.sendall(data[: max(0, len(data) - (passed - self.limit))])
                    client.shutdown(socket.SHUT_RDWR)
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(): the port stops listening
        self.server.close()


# -- pull-through (test_mirror.py, tests/containerd/test_mirror_cri.py) ------------------------------

def add_mirror(registries, folder: pathlib.Path):  # type: ignore[no-untyped-def]
    """The TLS + htpasswd registry, mirrored under `hub/` (the login from Docker's config.json, the test CA):
    the `mirrored_upstream` fixture of tests/conftest.py."""
    registry = registries["secure"]
    env = {"DOCKER_CONFIG": str(docker_config(folder, registry.address, USER, PASSWORD))}
    out = run_cli("mirror", "add", "--repository", "hub", "--ca-file", str(registries["ca"]), registry.address,
                  env=env).stdout
    assert f"mirror hub/ -> {registry.address}" in out and f"logged in as {USER}" in out, out
    return registry


def upload_layout(client: httpx.Client, repository: str, tag: str, layout: pathlib.Path,
                  extra: list[tuple[bytes, str, str]] = ()) -> dict:
    """Upload an OCI image layout's (single) image as repository:tag, with `extra` layers ((blob, diff_id,
    media type)) on top; returns its manifest."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    for descriptor in manifest["layers"]:
        upload_blob(client, repository, (blobs / descriptor["digest"].split(":")[1]).read_bytes())
    for blob, diff_id, media_type in extra:
        manifest["layers"].append({"mediaType": media_type, **upload_blob(client, repository, blob)})
        config["rootfs"]["diff_ids"].append(diff_id)
    manifest["config"] = {**manifest["config"], **upload_blob(client, repository, json.dumps(config).encode())}
    upload_manifest(client, repository, tag, manifest)
    return manifest
