"""The hashing stream: the same digest and size whether the bytes are read through it or written through it."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading

import pytest

from imagestream.digests import HashingStream
from imagestream.errors import BadImage
from snapshotter.unpack import fetch_blob

DATA = bytes(range(256)) * 5000


def test_reading_and_writing_through_it_hash_every_byte():  # type: ignore[no-untyped-def]
    expected = "sha256:" + hashlib.sha256(DATA).hexdigest()
    reader = HashingStream(io.BytesIO(DATA))
    assert reader.read(1000) == DATA[:1000]
    reader.drain()
    assert (reader.oci_digest(), reader.size) == (expected, len(DATA))

    out = io.BytesIO()
    writer = HashingStream(out)
    for i in range(0, len(DATA), 4096):
        writer.write(DATA[i : i + 4096])
    assert out.getvalue() == DATA and writer.tell() == len(DATA)
    assert writer.oci_digest() == expected


def test_fetch_blob_checks_the_digest(tmp_path):  # type: ignore[no-untyped-def]
    class Blob(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry = f"127.0.0.1:{server.server_address[1]}"
        fetch_blob(registry, "sha256:" + hashlib.sha256(DATA).hexdigest(), tmp_path / "good")
        assert (tmp_path / "good").read_bytes() == DATA
        with pytest.raises(BadImage, match="does not match its digest"):
            fetch_blob(registry, "sha256:" + "0" * 64, tmp_path / "bad")
    finally:
        server.shutdown()
        server.server_close()
