"""An emulated regional link between a zone (node and zonal caches) and the regional store.

The zone stays on the host's loopback: Redis, the zonal cache, the node cache, the
FUSE clients and the commands they run. The regional store (Cassandra and
chunk_store) stays there too, but the zone reaches it only through this link:

    zonal_cache / node_cache (host)
        │ TCP to 10.231.X.2:PORT
        ▼
    veth isbX-h (host) ══ tbf rate R ══► veth isbX-n (netns isbench-X)   requests
    veth isbX-h (host) ◄══ tbf rate R ══ veth isbX-n (netns isbench-X)   responses (the chunks)
        │ listening socket made inside the netns, owned by benchmarks.linkproxy,
        │ which holds every byte for RTT/2 in each direction
        ▼
    chunk_store 127.0.0.1:PORT (host) ── Cassandra

`tbf` caps the bandwidth both ways (this kernel has no `netem`), the proxy adds
the round-trip time. Nothing in the stack changes but two settings:
IMAGESTREAM_ZONAL_UPSTREAMS and the regional fallback in IMAGESTREAM_NODE_UPSTREAMS
name the link's address. Pushes and benchmark bookkeeping use the store's own
address and so bypass the link.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time

from benchmarks import linkproxy


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    name: str
    rate_mbit: float  # 0: no bandwidth cap
    rtt_ms: float

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "no bandwidth cap"
        return f"{self.name}: {rate}, {self.rtt_ms:g} ms RTT"


DEFAULT = LinkProfile("default", 100, 20)
SLOW = LinkProfile("slow", 25, 50)
FAST = LinkProfile("fast", 1000, 2)  # quick mode: exercises the same path in little time
OPEN = LinkProfile("unshaped", 0, 0)

TBF_BURST = "64kb"  # bucket depth; larger bursts let a single chunk through faster than the rate
TBF_LATENCY = "50ms"  # queue bound of the tbf (how long a packet may wait before it is dropped)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check)


def _free_subnet(tag: int) -> int:
    """X of a 10.231.X.0/24 no interface of this machine uses yet (other benchmark runs may hold some)."""
    used = _ip("ip", "-o", "-4", "addr", "show").stdout
    for i in range(250):
        x = (tag + i) % 250
        if f" 10.231.{x}." not in used:
            return x
    raise RuntimeError("no free 10.231.X.0/24 subnet for the emulated link")


def _end(proxy: subprocess.Popen) -> None:
    if proxy.poll() is None:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


class Link:
    """The namespace, veth pair, tbf qdiscs and delaying proxy of one benchmark run; `close()` removes them all."""

    def __init__(self, upstream: str, tag: int, workdir: pathlib.Path, port: int = 9000) -> None:
        self.tag = _free_subnet(tag)
        self.netns = f"isbench-{tag}-{os.getpid()}"
        self.host_if, self.ns_if = f"isb{self.tag}h{os.getpid() % 10000}", f"isb{self.tag}n{os.getpid() % 10000}"
        self.host_ip, self.ns_ip = f"10.231.{self.tag}.1", f"10.231.{self.tag}.2"
        self.address = f"{self.ns_ip}:{port}"  # what the zone dials to reach the regional store
        self.upstream = upstream
        self.control = str(workdir / "link.sock")
        self.log = workdir / "linkproxy.log"
        self.proxy: subprocess.Popen | None = None
        self.forwards: dict[str, tuple[subprocess.Popen, str]] = {}  # address -> (proxy, control socket)
        self.profile = OPEN

    def open(self) -> Link:
        try:
            _ip("ip", "netns", "add", self.netns)
            _ip("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("ip", "link", "set", self.ns_if, "netns", self.netns)
            _ip("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _ip("ip", "link", "set", self.host_if, "up")
            _ip("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if, netns=self.netns)
            _ip("ip", "link", "set", self.ns_if, "up", netns=self.netns)
            _ip("ip", "link", "set", "lo", "up", netns=self.netns)
            self.proxy = self._proxy(self.address, self.upstream, self.control)
        except BaseException:
            self.close()
            raise
        return self

    def _proxy(self, listen: str, upstream: str, control: str) -> subprocess.Popen:
        """A delaying proxy listening on `listen` inside the namespace, forwarding to `upstream`; waits for it."""
        with open(self.log, "ab") as log:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.linkproxy", "--listen", listen, "--netns", self.netns,
                 "--upstream", upstream, "--rtt-ms", f"{self.profile.rtt_ms:g}", "--control", control],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH", "")])},
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                linkproxy.ask(control, "stats")
                return proxy
            except OSError:
                if proxy.poll() is not None or time.monotonic() > deadline:
                    _end(proxy)
                    raise RuntimeError(f"link proxy for {upstream} did not start; see {self.log}") from None
                time.sleep(0.1)

    def forward(self, port: int, upstream: str) -> str:
        """Another service behind the same link (same veth, same tbf, same RTT): the address to dial for it."""
        address = f"{self.ns_ip}:{port}"
        control = f"{self.control}.{port}"
        self.forwards[address] = (self._proxy(address, upstream, control), control)
        return address

    def forward_stats(self, address: str) -> dict:
        return linkproxy.ask(self.forwards[address][1], "stats")

    def shape(self, profile: LinkProfile) -> None:
        """Apply a profile: tbf on both ends of the veth pair, delay in the proxy."""
        for dev, netns in ((self.host_if, None), (self.ns_if, self.netns)):
            if profile.rate_mbit:
                _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{profile.rate_mbit:g}mbit",
                    "burst", TBF_BURST, "latency", TBF_LATENCY, netns=netns)
            else:
                _ip("tc", "qdisc", "del", "dev", dev, "root", netns=netns, check=False)
        for control in (self.control, *(c for _, c in self.forwards.values())):
            linkproxy.ask(control, f"rtt {profile.rtt_ms:g}")
        self.profile = profile

    def qdiscs(self) -> str:
        """The qdiscs as the kernel reports them (printed with the results)."""
        host = _ip("tc", "qdisc", "show", "dev", self.host_if, check=False).stdout.strip()
        ns = _ip("tc", "qdisc", "show", "dev", self.ns_if, netns=self.netns, check=False).stdout.strip()
        return f"{host} | {ns}"

    def stats(self) -> dict:
        return linkproxy.ask(self.control, "stats")

    def reset(self) -> dict:
        return linkproxy.ask(self.control, "reset")

    def close(self) -> None:
        for proxy, control in self.forwards.values():
            _end(proxy)
            pathlib.Path(control).unlink(missing_ok=True)
        self.forwards.clear()
        if self.proxy is not None:
            _end(self.proxy)
        _ip("ip", "link", "del", self.host_if, check=False)  # removes its peer too
        _ip("ip", "netns", "del", self.netns, check=False)
        pathlib.Path(self.control).unlink(missing_ok=True)

    def __enter__(self) -> Link:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
