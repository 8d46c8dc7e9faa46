"""Leases held by a connection (fuse_client/held.py), the start path of `imagestream run`: the lease lasts as
long as the caller's connection, a killed caller leaves nothing attached, and a hostile caller gets an error,
not another caller's lease."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from fuse_client import attach, held
from imagestream.errors import InvalidArgument, NotFound

from tests.conftest import needs_fuse
from tests.fuse.test_mount import node  # noqa: F401 - the fixture

pytestmark = needs_fuse


def _leases() -> list[str]:
    attached, _, _ = attach.attachments()
    return [lease for a in attached for lease in a.leases]


def _wait_until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def test_a_held_lease_lasts_as_long_as_its_connection(node) -> None:  # type: ignore[no-untyped-def,no-redef]
    _, _, _, expected = node

    def check() -> None:
        lease = held.hold("sample", "run:one", download=False)
        path = lease.attached.path
        assert lease.attached.image == "sample" and os.listdir(path)
        with open(os.path.join(path, "etc/multi"), "rb") as f:
            assert f.read() == expected["etc/multi"]
        [name] = _leases()
        assert name.startswith("held:") and name.endswith(":run:one")
        assert lease.detach() is True  # the last lease: the directory went with it
        assert not os.path.exists(path) and _leases() == []
        with held.hold("sample", "run:two", download=False):  # closing without a detach ends it too
            assert len(_leases()) == 1
        _wait_until(lambda: _leases() == [])

    await asyncio.to_thread(check)


async def test_a_killed_caller_leaves_nothing_attached(node) -> None:  # type: ignore[no-untyped-def,no-redef]
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fuse_client import held; "
         "h = held.hold('sample', 'run:killed', download=False); print(h.attached.path, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        path = (await asyncio.to_thread(child.stdout.readline)).strip()  # type: ignore[union-attr]
        assert os.path.isdir(path) and len(await asyncio.to_thread(_leases)) == 1
        child.send_signal(signal.SIGKILL)  # no goodbye, no Detach
        await asyncio.to_thread(child.wait, 10)
        await asyncio.to_thread(_wait_until, lambda: _leases() == [])
        assert not os.path.exists(path)
    finally:
        child.kill()


async def test_errors_are_the_apis_errors(node) -> None:  # type: ignore[no-untyped-def,no-redef]
    def check() -> None:
        with pytest.raises(NotFound):
            held.hold("no-such-image", "run:x")
        with pytest.raises(held.NotServing, match="does not answer"):
            os.environ["IMAGESTREAM_FUSE_SOCKET"] = "/nonexistent/fuse.sock"
            try:
                held.hold("sample", "run:x")
            finally:
                del os.environ["IMAGESTREAM_FUSE_SOCKET"]

    await asyncio.to_thread(check)


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"attach": "sample"}\n',
    b'{"attach": {"image": "sample", "lease": "x"}, "detach": {}}\n',
    b'{"attach": {"image": "sample", "no_such_field": 1}}\n',
    b'{"attach": {"image": 7}}\n',
    b'{"detach": {"wait": true}}\n',
])
async def test_a_hostile_request_gets_an_error_and_no_lease(node, line) -> None:  # type: ignore[no-untyped-def,no-redef]
    def check() -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(held.socket_path())
            s.sendall(line)
            reply = json.loads(s.makefile("rb").readline())
        assert _leases() == []
        return reply

    reply = await asyncio.to_thread(check)
    assert reply["error"]["kind"] == InvalidArgument.__name__ and reply["error"]["message"]


async def test_a_caller_cannot_end_another_callers_lease(node) -> None:  # type: ignore[no-untyped-def,no-redef]
    def check() -> None:
        with held.hold("sample", "run:victim", download=False) as victim:
            [victims] = _leases()
            with held.hold("sample", victims, download=False) as thief:  # naming the victim's lease ...
                assert thief.detach() is False  # ... gives a lease of its own; the victim's stays
            assert _leases() == [victims] and os.listdir(victim.attached.path)

    await asyncio.to_thread(check)


async def test_the_lease_socket_is_the_owners_alone(node) -> None:  # type: ignore[no-untyped-def,no-redef]
    mode = os.stat(held.socket_path()).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

