"""A delaying TCP proxy: the round-trip time of an emulated regional link, added in user space.

    python -m benchmarks.linkproxy --listen 10.231.0.2:9000 --netns NAME \\
        --upstream 127.0.0.1:50061 --rtt-ms 20 --control /tmp/link.sock

This kernel has `tbf` (bandwidth) but not `netem` (delay), so the delay comes from
here. Every byte is held for half the round-trip time in each direction before
it is passed on; bytes keep flowing meanwhile (a pipe, not stop-and-wait), so a
transfer costs one RTT plus its size over the bandwidth, as on a real link.
The queue of each direction is bounded, so a slow reader pushes back on the
writer as TCP would. A new connection gets no extra handshake delay (gRPC keeps
its connections open).

With --netns, the listening socket is made inside that network namespace (the
process itself stays in its own): clients reach it through the veth pair and its
`tbf` qdiscs, while the upstream is dialled from the host side.

The control socket answers one line commands: `stats` (JSON byte and connection
counters), `rtt MS` (change the delay), `reset` (zero the counters).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import socket

CLONE_NEWNET = 0x40000000
MAX_QUEUED = 4 << 20  # bytes held per direction before the reading side waits


class Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.up_bytes = 0  # client -> upstream (requests)
        self.down_bytes = 0  # upstream -> client (responses: the chunks)
        self.connections = 0


class Proxy:
    def __init__(self, upstream: tuple[str, int], rtt_s: float) -> None:
        self.upstream = upstream
        self.rtt_s = rtt_s
        self.counters = Counters()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self.pipe(reader, up_writer, "up_bytes"), self.pipe(up_reader, writer, "down_bytes"),
                             return_exceptions=True)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """Copy reader to writer, each piece released half an RTT after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Event()
        room.set()
        queued = 0

        async def receive() -> None:
            nonlocal queued
            try:
                while True:
                    await room.wait()
                    data = await reader.read(256 * 1024)
                    queue.put_nowait((loop.time() + self.rtt_s / 2, data))
                    if not data:
                        return
                    setattr(self.counters, counter, getattr(self.counters, counter) + len(data))
                    queued += len(data)
                    if queued > MAX_QUEUED:
                        room.clear()
            except (ConnectionError, OSError):
                queue.put_nowait((loop.time(), b""))

        async def send() -> None:
            nonlocal queued
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                if queued <= MAX_QUEUED:
                    room.set()

        receiver = asyncio.ensure_future(receive())
        try:
            await send()
        except (ConnectionError, OSError):
            pass
        finally:
            receiver.cancel()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().split()
        if line[:1] == ["rtt"] and len(line) == 2:
            self.rtt_s = float(line[1]) / 1000
        elif line[:1] == ["reset"]:
            self.counters.reset()
        c = self.counters
        writer.write((json.dumps({"up_bytes": c.up_bytes, "down_bytes": c.down_bytes, "connections": c.connections,
                                  "rtt_ms": self.rtt_s * 1000}) + "\n").encode())
        await writer.drain()
        writer.close()


def listening_socket(host: str, port: int, netns: str | None) -> socket.socket:
    """A listening TCP socket, made inside network namespace `netns` if given (this thread returns home after)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY) if netns else None
    try:
        if netns:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    finally:
        if home is not None:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home failed")
            os.close(home)


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    up_host, _, up_port = args.upstream.rpartition(":")
    proxy = Proxy((up_host, int(up_port)), args.rtt_ms / 1000)
    server = await asyncio.start_server(proxy.handle, sock=listening_socket(host, int(port), args.netns))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    control = await asyncio.start_unix_server(proxy.control, path=args.control)
    async with server, control:
        await asyncio.gather(server.serve_forever(), control.serve_forever())


def ask(control: str, command: str = "stats", timeout_s: float = 5.0) -> dict:
    """Send one command to a running proxy's control socket; its counters."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(control)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            part = s.recv(4096)
            if not part:
                break
            data += part
    return json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept clients on")
    parser.add_argument("--netns", default=None, help="network namespace to make the listening socket in")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--control", required=True, help="Unix socket for stats and settings")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
