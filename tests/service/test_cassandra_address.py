"""The chunk store finds Cassandra again at a new address, without a restart: as when Cassandra's pod is made
again with a new IP behind the same name.

A second chunk store process on the stack's real Cassandra, whose contact point is a host name that only its
own /etc/hosts knows (a private mount namespace with a hosts file bind-mounted over /etc/hosts, so the name is
resolved by the C library as any name is). Cassandra is reached through a TCP forwarder on that address
(`benchmarks.linkproxy`, no delay). The forwarder is killed, as the old pod goes, and a new one listens at
another address that the hosts file now gives the name: the chunk store answers again.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from imagestream.v1 import images_pb2, images_pb2_grpc

from tests.conftest import run_cli

pytestmark = [pytest.mark.services,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")]

NAME = "cassandra.imagestream.test"


def forwarder(tmp: pathlib.Path, listen: str, upstream: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.linkproxy", "--listen", listen, "--upstream", upstream,
                                "--rtt-ms", "0", "--control", str(tmp / f"{listen}.sock")],
                               cwd=pathlib.Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    host, port = listen.rsplit(":", 1)
    deadline = time.monotonic() + 30
    while subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"], capture_output=True).returncode:
        assert process.poll() is None and time.monotonic() < deadline, f"the forwarder on {listen} did not start"
        time.sleep(0.2)
    return process


def resolve(channel: grpc.Channel, name: str) -> images_pb2.Image:
    return images_pb2_grpc.ImagesStub(channel).ResolveImage(images_pb2.ResolveImageRequest(name=name), timeout=10)


def test_the_chunk_store_follows_cassandra_to_its_new_address(stack, debian_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagestream import tls
    from imagestream.rpc import healthcheck

    run_cli("push", "-q", str(debian_image), "moving/cassandra:1")
    base = int(os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100"))
    cassandra = f"127.0.0.1:{os.environ['IMAGESTREAM_CASSANDRA_PORT']}"
    port = base + 19  # on 127.0.0.2 and 127.0.0.3: the old address and the new one
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {NAME}\n")
    old = forwarder(tmp_path, f"127.0.0.2:{port}", cassandra)
    new = None
    grpc_at = f"127.0.0.1:{base + 16}"
    env = {**os.environ, "IMAGESTREAM_CASSANDRA_HOSTS": NAME, "IMAGESTREAM_CASSANDRA_PORT": str(port),
           "IMAGESTREAM_CHUNK_STORE_LISTEN": grpc_at, "IMAGESTREAM_DISTRIBUTION_LISTEN": "",
           "IMAGESTREAM_CHUNK_STORE_METRICS": f"127.0.0.1:{base + 18}", "OTEL_TRACES_EXPORTER": "none"}
    log = tmp_path / "chunk_store.log"
    with open(log, "wb") as out:
        store = subprocess.Popen(["unshare", "--mount", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$0" -m chunk_store',
                                  sys.executable], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while healthcheck.status(grpc_at, timeout_s=1) != "SERVING":
            assert store.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        tls.set_identity("zonal-cache")  # a reader of the region
        with tls.grpc_channel(grpc_at, aio=False) as channel:
            assert resolve(channel, "moving/cassandra:1").index.hash

            # the old address goes, the name now leads to the new one
            old.kill()
            old.wait(10)
            hosts.write_text(f"127.0.0.1 localhost\n127.0.0.3 {NAME}\n")  # in place: the bind mount shows it
            with pytest.raises(grpc.RpcError) as refused:
                resolve(channel, "moving/cassandra:1")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            new = forwarder(tmp_path, f"127.0.0.3:{port}", cassandra)
            deadline, answer = time.monotonic() + 60, None
            while answer is None:
                try:
                    answer = resolve(channel, "moving/cassandra:1")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    assert time.monotonic() < deadline, f"no answer at the new address: {e.details()}\n{log.read_text()}"
                    time.sleep(1)
            assert answer.index.hash
        assert store.poll() is None  # the same process: not restarted
        assert "connected again" in log.read_text()
    finally:
        tls.set_identity("pusher")
        store.terminate()
        store.wait(30)
        for process in (old, new):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
