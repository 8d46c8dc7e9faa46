"""A client of the OCI Distribution API (registry v2), as much of it as `push REF` reads.

Built on httpx (synchronous, streaming): the converter reads a layer as a file
object in one pass, so a blob's body is handed over as a file whose reads come
straight off the socket. httpx brings what hand-written HTTP would get wrong:
redirects (blobs are often served from another host: the Authorization header
is dropped when the host changes), TLS with a custom CA, timeouts, chunked
bodies. What is ours is the registry's part, small and in one place: references,
credentials from Docker's config.json, the WWW-Authenticate challenge (basic,
and bearer tokens from the realm the registry names), manifests by media type.

Every answer is checked: manifests against their digest, sizes against the
descriptor, blobs (by the caller, `source.py`) against their digest while they
stream. Any failure is a RegistryError with one line naming the registry, the
repository and what went wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import ssl
from collections.abc import Iterator
from typing import IO, Literal

import httpx

from imagestream.errors import BadImage, ImagestreamError
from imagestream.oci import IMAGE_INDEX_TYPES, MANIFEST_TYPES

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_MANIFEST_BYTES = 4 << 20  # distribution's own limit for a manifest

REPOSITORY_PATTERN = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
HOST_PATTERN = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?\Z")

SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")


class RegistryError(ImagestreamError):
    """A registry refused, failed or answered something malformed."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """registry/repository[:tag][@digest]"""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def reference(self) -> str:
        """What to ask /manifests/ for: the digest if one is given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")


def looks_like_reference(text: str) -> bool:
    """A registry reference names a host first (with a dot, a port, or localhost), as docker does."""
    text = text.removeprefix("docker://")
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def parse_reference(text: str) -> Reference:
    """'registry:5000/team/app:1.0', 'host/app@sha256:...' (a `docker://` prefix is allowed); BadImage says why not."""
    raw = text.removeprefix("docker://")
    name, at, digest = raw.partition("@")
    if at and not _DIGEST.match(digest):
        raise BadImage(f"{text}: digest {digest!r} is not sha256:<64 lower-case hex digits>")
    host, sep, rest = name.partition("/")
    if not sep or not HOST_PATTERN.match(host):
        raise BadImage(f"{text}: not a registry reference (want HOST[:PORT]/REPOSITORY[:TAG][@DIGEST])")
    repository, tag = rest, ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = rest.rpartition(":")
        if not _TAG.match(tag):
            raise BadImage(f"{text}: invalid tag {tag!r}")
    if not REPOSITORY_PATTERN.match(repository) or len(repository) > 255:
        raise BadImage(f"{text}: invalid repository {repository!r} (lower-case letters, digits, separators)")
    if host == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    return Reference(host, repository, tag, digest)


# -- credentials ---------------------------------------------------------------------------------

def docker_config_path() -> pathlib.Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json (as the docker CLI reads it)."""
    folder = os.environ.get("DOCKER_CONFIG")
    return pathlib.Path(folder) / "config.json" if folder else pathlib.Path.home() / ".docker" / "config.json"


def credentials(registry: str, path: pathlib.Path | None = None) -> tuple[str, str] | None:
    """(username, password) for `registry` from the `auths` of Docker's config.json, or None.

    Entries are keyed by host[:port], optionally with a scheme and a path (https://index.docker.io/v1/ is
    Docker Hub's). `auth` is base64 of 'user:password'; `username`/`password` fields are read too.
    Credential helpers (`credsStore`, `credHelpers`) are not run."""
    path = path or docker_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"{path}: cannot read Docker's config ({e.strerror})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RegistryError(f"{path}: not valid JSON ({e})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {registry, DOCKER_HUB_API, "index.docker.io"} if registry == DOCKER_HUB else {registry}
    for key, entry in auths.items():
        host = re.sub(r"^[a-z]+://", "", str(key)).split("/", 1)[0]
        if host not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise RegistryError(f"{path}: auths[{key!r}].auth is not base64 of 'user:password'") from None
            if not sep:
                raise RegistryError(f"{path}: auths[{key!r}].auth is not base64 of 'user:password'")
            return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


# -- the challenge -------------------------------------------------------------------------------

_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="https://auth",service="reg",scope="repository:a:pull"' -> ('bearer', {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class _Auth(httpx.Auth):
    """Answers the registry's WWW-Authenticate challenge once per scheme: basic with the configured
    credentials, or a bearer token fetched from the realm (with those credentials, if any)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.header: str | None = None

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        if self.header:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        self.header = self.client._answer(challenge)
        request.headers["Authorization"] = self.header
        yield request


# -- the client ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Manifest:
    content: bytes
    media_type: str
    digest: str

    def json(self) -> dict:
        try:
            doc = json.loads(self.content)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadImage(f"manifest {self.digest}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise BadImage(f"manifest {self.digest}: expected a JSON object")
        return doc


ACCEPT = ", ".join([*MANIFEST_TYPES, *IMAGE_INDEX_TYPES])


class RegistryClient:
    """One repository of one registry: manifests and blobs, authenticated as Docker's config says."""

    def __init__(self, ref: Reference, ca_file: str | None = None, plain_http: bool = False,
                 timeout_s: float = 60.0, config_path: pathlib.Path | None = None,
                 login: tuple[str, str] | None | Literal["config"] = "config", ca_pem: str = "") -> None:
        """`login`: (user, password), None for anonymous, or "config": from Docker's config.json. `ca_pem`: a
        CA's PEM text, as a mirror's record keeps it, instead of `ca_file`."""
        self.ref = ref
        host = DOCKER_HUB_API if ref.registry == DOCKER_HUB else ref.registry
        self.origin = f"{'http' if plain_http else 'https'}://{host}"
        self.base = f"{self.origin}/v2/{ref.repository}"
        self.where = f"{ref.registry}/{ref.repository}"
        self.config_path = config_path or docker_config_path()
        self.creds = credentials(ref.registry, self.config_path) if login == "config" else login
        verify: ssl.SSLContext | bool = True
        if ca_file or ca_pem:
            try:
                verify = ssl.create_default_context(cafile=ca_file or None, cadata=ca_pem or None)
            except (OSError, ssl.SSLError, ValueError) as e:
                what = f"--ca-file {ca_file}" if ca_file else "the CA"
                raise RegistryError(f"{what}: not a readable PEM certificate ({e})") from None
        self.verify = verify
        self.http = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                 follow_redirects=True, auth=_Auth(self),
                                 headers={"User-Agent": "imagestream"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- auth --------------------------------------------------------------------------------------
    def _basic(self) -> str:
        assert self.creds is not None
        return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()

    def _answer(self, challenge: str) -> str:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.creds is None:
                raise RegistryError(f"{self.where}: the registry asks for a login and {self.config_path} has none "
                                    f"for {self.ref.registry} (docker login {self.ref.registry})")
            return self._basic()
        if scheme == "bearer":
            return "Bearer " + self._token(params)
        raise RegistryError(f"{self.where}: unsupported authentication scheme {challenge[:80]!r}")

    def _token(self, params: dict[str, str]) -> str:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{self.where}: bearer challenge without a usable realm ({realm[:80]!r})")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Authorization": self._basic()} if self.creds else {}
        try:
            # a request of its own: the token endpoint is another server, not under the registry's challenge
            response = httpx.get(realm, params=query, headers=headers, verify=self.verify, timeout=30.0)
        except httpx.HTTPError as e:
            raise RegistryError(f"{self.where}: token service {realm} unreachable ({type(e).__name__}: {e})") from None
        if response.status_code in (401, 403):
            who = f"credentials for {self.ref.registry} in {self.config_path}" if self.creds else "anonymous access"
            raise RegistryError(f"{self.where}: token service {realm} refused {who} (HTTP {response.status_code})")
        if response.status_code != 200:
            raise RegistryError(f"{self.where}: token service {realm} answered HTTP {response.status_code}")
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.where}: token service {realm} answered no token")
        return token

    # -- requests ----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, accept: str | None = None, stream: bool = False) -> httpx.Response:
        url = f"{self.base}/{path}" if path else f"{self.origin}/v2/"
        request = self.http.build_request(method, url, headers={"Accept": accept} if accept else None)
        try:
            response = self.http.send(request, stream=stream)
        except RegistryError:
            raise
        except ssl.SSLError as e:
            raise RegistryError(f"{self.where}: TLS failed ({e.reason or e}); a private CA needs --ca-file, "
                                f"a plain-HTTP registry --plain-http") from None
        except httpx.ConnectError as e:
            text = str(e).upper()
            hint = ("; a private CA needs --ca-file" if "CERTIFICATE" in text else
                    "; a plain-HTTP registry needs --plain-http" if "WRONG_VERSION_NUMBER" in text else "")
            raise RegistryError(f"{self.where}: cannot connect ({e}){hint}") from None
        except httpx.HTTPError as e:
            raise RegistryError(f"{self.where}: {type(e).__name__}: {e}") from None
        if response.status_code == 401:
            response.close()
            who = f"the credentials for {self.ref.registry} in {self.config_path}" if self.creds else "anonymous access"
            raise RegistryError(f"{self.where}: unauthorized: the registry refused {who}")
        if response.status_code == 403:
            response.close()
            raise RegistryError(f"{self.where}: access denied (HTTP 403)")
        return response

    @staticmethod
    def _error_code(response: httpx.Response) -> str:
        try:
            errors = json.loads(response.read()).get("errors") or []
            return f" ({errors[0].get('code', '')}: {str(errors[0].get('message', ''))[:200]})"
        except (ValueError, AttributeError, IndexError, TypeError):
            return ""

    def manifest(self, reference: str) -> Manifest:
        """The manifest or image index `reference` (a tag or a digest) names, checked against its digest."""
        what = f"{self.where}:{reference}" if not reference.startswith("sha256:") else f"{self.where}@{reference}"
        response = self._send("GET", f"manifests/{reference}", accept=ACCEPT, stream=True)
        try:
            if response.status_code == 404:
                raise RegistryError(f"{what}: no such manifest (tag or digest unknown){self._error_code(response)}")
            if response.status_code != 200:
                raise RegistryError(f"{what}: registry answered HTTP {response.status_code}{self._error_code(response)}")
            content = b""
            try:
                for data in response.iter_bytes():
                    content += data
                    if len(content) > MAX_MANIFEST_BYTES:
                        raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            except httpx.HTTPError as e:
                raise RegistryError(f"{what}: manifest cut short ({type(e).__name__}: {e})") from None
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest", "")
        finally:
            response.close()
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise BadImage(f"{what}: the registry's manifest does not match its digest (content is {digest})")
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise BadImage(f"{what}: manifest does not match the Docker-Content-Digest {header_digest} (content is {digest})")
        try:
            declared = json.loads(content).get("mediaType")
        except (ValueError, UnicodeDecodeError, AttributeError):
            declared = None
        media_type = declared if isinstance(declared, str) and declared else media_type
        if media_type in SCHEMA1_TYPES:
            raise BadImage(f"{what}: Docker schema 1 manifests are not supported (push it again with a current docker)")
        return Manifest(content, media_type, digest)

    def ping(self) -> None:
        """Log in to the registry (GET /v2/, answering its challenge): RegistryError says why it cannot."""
        response = self._send("GET", "")
        response.close()
        if response.status_code != 200:
            raise RegistryError(f"{self.ref.registry}: /v2/ answered HTTP {response.status_code}: not a registry "
                                f"speaking the OCI Distribution API")

    def open_blob(self, digest: str, size: int | None) -> _BodyStream:
        """The blob's body as a file, streamed off the connection. Its length is checked against `size`
        (the descriptor's; None: the Content-Length the registry announces, which it must then give); its
        digest is the caller's to check as it reads (HashingStream)."""
        response = self._send("GET", f"blobs/{digest}", stream=True)
        if response.status_code != 200:
            code = self._error_code(response)
            response.close()
            if response.status_code == 404:
                raise RegistryError(f"{self.where}: blob {digest} is missing from the registry{code}")
            raise RegistryError(f"{self.where}: blob {digest}: registry answered HTTP {response.status_code}{code}")
        length = response.headers.get("Content-Length")
        if size is None:
            if length is None or not length.isdigit():
                response.close()
                raise RegistryError(f"{self.where}: blob {digest}: the registry announced no Content-Length")
            size = int(length)
        if length is not None and length.isdigit() and int(length) != size:
            response.close()
            raise BadImage(f"{self.where}: blob {digest} is {length} bytes, its descriptor says {size}")
        return _BodyStream(response, f"{self.where}: blob {digest}", size)


class _BodyStream(io.RawIOBase):
    """A streamed HTTP body as a raw file; a connection that fails or ends early is a RegistryError
    saying how far it got, and a body longer than announced is refused."""

    def __init__(self, response: httpx.Response, what: str, size: int) -> None:
        self.response = response
        self.what = what
        self.size = size
        self.read_bytes = 0
        self._chunks: Iterator[bytes] = response.iter_raw(1 << 20)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        if not self._buffer:
            try:
                self._buffer = next(self._chunks, b"")
            except httpx.HTTPError as e:
                raise RegistryError(f"{self.what}: connection lost after {self.read_bytes} of {self.size} bytes "
                                    f"({type(e).__name__}: {e or 'closed'})") from None
            if not self._buffer:
                if self.read_bytes != self.size:
                    raise RegistryError(f"{self.what}: body ended after {self.read_bytes} of {self.size} bytes")
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self.read_bytes += n
        if self.read_bytes > self.size:
            raise BadImage(f"{self.what}: longer than the {self.size} bytes its descriptor says")
        return n

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()
