"""Traced end to end into the real Zipkin of the stack, and Prometheus metrics from every service."""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
import urllib.request

import pytest

from fuse_client import mounts
from imagestream import config
from imagestream_dev.stack import local

from tests.conftest import needs_fuse, run_cli

pytestmark = [pytest.mark.services, needs_fuse]


def zipkin(path: str):  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"http://127.0.0.1:{config.get('zipkin_port')}{path}", timeout=10) as reply:
        return json.load(reply)


def read_traces(since_ms: int, want, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Traces with a 'fuse read' root started after `since_ms`, once `want(traces)` is true."""
    deadline = time.monotonic() + timeout
    while True:
        traces = zipkin(f"/api/v2/traces?serviceName=fuse_client&spanName=fuse%20read&limit=1000"
                        f"&endTs={int(time.time() * 1000) + 1000}&lookback={int(time.time() * 1000) - since_ms + 1000}")
        traces = [t for t in traces if any(s["name"] == "fuse read" and "parentId" not in s for s in t)]
        if want(traces) or time.monotonic() > deadline:
            return traces
        time.sleep(0.5)


def services(trace) -> set[str]:  # type: ignore[no-untyped-def]
    return {s["localEndpoint"]["serviceName"] for s in trace}


def arrived(trace) -> bool:  # type: ignore[no-untyped-def]
    """Every span's parent is in the trace: a parent ends after its children and is sent after them, so a
    trace read too early lacks it."""
    ids = {s["id"] for s in trace}
    return all(s["parentId"] in ids for s in trace if "parentId" in s)


def check_links(trace) -> dict:  # type: ignore[no-untyped-def]
    """Every parent exists in the trace; a server span's parent is a client span of another service."""
    by_id = {s["id"]: s for s in trace}
    for s in trace:
        if "parentId" not in s:
            continue
        parent = by_id.get(s["parentId"])
        assert parent is not None, f"span {s['name']} in {s['localEndpoint']['serviceName']} has no parent in the trace"
        if s.get("kind") == "SERVER":
            assert parent.get("kind") == "CLIENT", (s["name"], parent["name"])
            assert parent["localEndpoint"]["serviceName"] != s["localEndpoint"]["serviceName"]
    return by_id


def ancestors(span, by_id):  # type: ignore[no-untyped-def]
    while "parentId" in span:
        span = by_id[span["parentId"]]
        yield span


@pytest.fixture(scope="module")
def image(stack, debian_image):  # type: ignore[no-untyped-def]
    run_cli("push", "-q", str(debian_image), "debian-python:traced")
    return "debian-python:traced"


def test_a_cold_read_is_one_trace_through_every_tier_and_a_warm_read_stops_at_the_node(image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.empty_caches()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    since = int(time.time() * 1000)
    mounts.mount(image, mnt, download=False)  # no background download: the read itself goes upstream
    try:
        data = (mnt / "usr/lib/python3.11/json/decoder.py").read_bytes()
    finally:
        mounts.unmount(mnt)
    assert b"JSONDecodeError" in data
    every_tier = {"fuse_client", "node_cache", "zonal_cache", "chunk_store"}
    traces = read_traces(since, lambda ts: any(every_tier <= services(t) and arrived(t) for t in ts))
    cold = next((t for t in traces if every_tier <= services(t) and arrived(t)), None)
    assert cold is not None, [sorted(services(t)) for t in traces]
    by_id = check_links(cold)
    cassandra = [s for s in cold if s["name"] == "cassandra query"]
    assert cassandra and all(s["localEndpoint"]["serviceName"] == "chunk_store" for s in cassandra)
    assert any(a["name"].lower().endswith("getchunk") and a.get("kind") == "SERVER"
               and a["localEndpoint"]["serviceName"] == "chunk_store" for a in ancestors(cassandra[0], by_id))
    tiers = {s["tags"].get("imagestream.tier"): s["tags"].get("imagestream.hit") for s in cold
             if "imagestream.tier" in s.get("tags", {})}
    assert tiers.get("node memory") == "false" and tiers.get("zonal") == "false"
    assert any(s["tags"].get("imagestream.image") == image for s in cold if "tags" in s)

    # the same file again from a new mount (the FUSE client's cache went with the last mount, and the
    # kernel's is dropped): the node has it
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
    since = int(time.time() * 1000)
    mounts.mount(image, mnt2, download=False)
    try:
        assert (mnt2 / "usr/lib/python3.11/json/decoder.py").read_bytes() == data
    finally:
        mounts.unmount(mnt2)
    warm = read_traces(since, lambda ts: len(ts) > 0)
    assert warm
    for t in warm:
        check_links(t)
        assert services(t) <= {"fuse_client", "node_cache"}, sorted(services(t))


def metrics(address: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_answer_in_prometheus_format_and_move_with_reads(image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.empty_caches()
    addresses = {name: config.get(f"{name}_metrics") for name in ("chunk_store", "zonal_cache", "node_cache")}
    before = {name: metrics(a) for name, a in addresses.items()}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount(image, mnt, download=False)
    try:
        for name in ("email/parser.py", "json/encoder.py", "logging/__init__.py"):
            (mnt / "usr/lib/python3.11" / name).read_bytes()
    finally:
        mounts.unmount(mnt)
    after = {name: metrics(a) for name, a in addresses.items()}

    def moved(service: str, metric: str, labels: str) -> float:
        return after[service].get((metric, labels), 0) - before[service].get((metric, labels), 0)

    assert moved("node_cache", "imagestream_chunk_requests_total", '{result="miss",tier="node_memory"}') > 0
    assert moved("node_cache", "imagestream_node_upstream_fetches_total", '{kind="blocking"}') > 0
    assert moved("zonal_cache", "imagestream_chunk_requests_total", '{result="miss",tier="zonal"}') > 0
    assert moved("chunk_store", "imagestream_chunk_requests_total", '{result="hit",tier="regional"}') > 0
    assert moved("zonal_cache", "imagestream_upstream_fetch_seconds_count", '{tier="zonal"}') > 0
    assert ("imagestream_cache_capacity_bytes", '{tier="node_memory"}') in after["node_cache"]
    # every metric follows the naming scheme
    for service in after.values():
        for name, _ in service:
            if not name.startswith(("python_", "process_")):
                assert name.startswith("imagestream_"), name
