"""The ports of a private stack (tests, benchmarks): distinct, and out of the kernel's ephemeral range.

A listener on a port in the ephemeral range can find it held by an outgoing connection of the
stack itself (a Cassandra session, a span exporter) and fail to start.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from imagestream_dev.stack import local

EPHEMERAL = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")


def ports(env: dict[str, str]) -> list[int]:
    found = []
    for key, value in env.items():
        if key.endswith(("_LISTEN", "_METRICS", "_URL")):
            found.append(int(re.search(r":(\d+)(/|$)", value).group(1)))
        elif key.endswith("_PORT"):
            found.append(int(value))
    return found


@pytest.mark.parametrize("base", [20100, 20300, 21000, 22300])
def test_a_private_stack_listens_on_distinct_ports_below_the_ephemeral_range(base: int) -> None:
    env = local.private_env(pathlib.Path("/nonexistent/home"), pathlib.Path("/nonexistent/cache"), base)
    found = ports(env)
    assert len(found) == 12, env
    assert len(set(found)) == len(found), f"two services share a port: {sorted(found)}"
    assert all(base <= p < base + 100 for p in found), sorted(found)
    low = int(EPHEMERAL.read_text().split()[0]) if EPHEMERAL.exists() else 32768
    assert max(found) < low, f"{max(found)} is in the ephemeral range, from {low}"


def test_the_upstreams_of_a_private_stack_are_its_own_services() -> None:
    env = local.private_env(pathlib.Path("/h"), pathlib.Path("/c"), 20100)
    assert env["IMAGESTREAM_ZONAL_UPSTREAMS"] == env["IMAGESTREAM_CHUNK_STORE_LISTEN"]
    assert env["IMAGESTREAM_NODE_UPSTREAMS"].split(",") == [env["IMAGESTREAM_ZONAL_CACHE_LISTEN"],
                                                            env["IMAGESTREAM_CHUNK_STORE_LISTEN"]]
    assert env["IMAGESTREAM_REGION"] == env["IMAGESTREAM_CHUNK_STORE_LISTEN"]
