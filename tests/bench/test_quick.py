"""The benchmark's quick mode runs in the suite so that it cannot rot: a tiny image, one run, on the
session's stack behind a real emulated link (netns + veth + tbf + delaying proxy), and the JSON it
writes is checked field by field."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, needs_fuse, run_cli

# the quick run (every part, the baselines included: a registry, containerd, the stargz peer, eStargz conversion) runs
# in the first test's fixture: more than the suite's default 600 s on a busy machine
pytestmark = [pytest.mark.services, needs_fuse, pytest.mark.timeout(1800),
              pytest.mark.skipif(shutil.which("tc") is None or shutil.which("ip") is None,
                                 reason="needs iproute2 (ip netns, tc) for the emulated link")]

MODES = ("full_pull", "stream_cold", "stream_profile", "warm")
TIERS = ("regional_direct", "regional_via_default_link", "zonal_hit", "node_memory_hit",
         "node_disk_hit_page_cache_dropped", "node_disk_hit_page_cache_hot")


@pytest.fixture(scope="module")
def quick(stack, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT)])}
    # the peers' registry listens at the port base + 40, outside the stack's own ports
    port_base = os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--quick", "--use-running-stack", "--out", str(out),
                             "--port-base", port_base],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1700)
    except BaseException:
        proc.terminate()  # SIGTERM: the benchmark removes its link, registry and nodes on its way out
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    assert proc.returncode == 0, f"{stdout[-4000:]}\n{stderr[-4000:]}"
    return out, json.loads((out / "bench.json").read_text()), stdout


def _positive(x: object, upper: float = float("inf")) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < upper


def test_run_and_settings(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    assert r["quick"] is True
    assert {"cpu", "cores", "memory_gib", "kernel", "python"} <= r["machine"].keys()
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    s = r["settings"]
    assert s["runs"] == 1 and s["fanout_n"]
    for link in ("default_link", "slow_link"):
        assert _positive(s[link]["rate_mbit"]) and s[link]["rtt_ms"] >= 0
    assert s["link_address"].startswith("10.231.")


def test_images(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    base, large = r["images"]["base"], r["images"]["large"]
    for im in (base, large):
        assert _positive(im["content_bytes"]) and _positive(im["compressed_bytes"]) and _positive(im["chunks"])
        assert _positive(im["index_bytes"]) and len(im["index_hash"]) == 64
        assert im["compressed_bytes"] < 2 * im["content_bytes"]
    # the filler is incompressible and never read: the large image is the base plus about its size
    grown = large["compressed_bytes"] - base["compressed_bytes"]
    assert 0.9 * large["filler_mb"] * 2**20 < grown < 1.2 * large["filler_mb"] * 2**20


def test_cold_start_cells(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    cs = r["cold_start"]["default"]
    assert cs["runs"] == 1 and "tbf" in cs["qdiscs"]
    cells = cs["by_image"]
    assert set(cells["base"]["python"]) == set(MODES)
    assert set(cells["base"]["http"]) == {"stream_cold", "warm"}
    assert set(cells["large"]["python"]) == {"full_pull", "stream_cold"}
    for image, commands in cells.items():
        for command, modes in commands.items():
            for mode, c in modes.items():
                assert len(c["samples"]) == 1 and c["median"] == c["samples"][0], (image, command, mode)
                assert _positive(c["median"], 600), (image, command, mode)
                if mode != "full_pull":
                    assert c["blocking_fetches"] and all(n >= 0 for n in c["blocking_fetches"])
    # a full pull moves the whole image over the regional link before the command can start
    for image in ("base", "large"):
        moved = cells[image]["python"]["full_pull"]["link_bytes_median"]
        assert moved >= 0.95 * r["images"][image]["compressed_bytes"], image
    # a cold streamed start must fetch something from the region; a warm one needs no blocking fetch
    assert cells["base"]["python"]["stream_cold"]["link_bytes_median"] > 0
    assert cells["base"]["python"]["stream_cold"]["blocking_fetches_median"] > 0
    assert cells["base"]["python"]["warm"]["blocking_fetches_median"] == 0


def test_bytes_before_first_output(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    for label, b in r["bytes"].items():
        image = r["images"][label]
        assert b["reads"] > 0 and 0 < b["files"] <= b["reads"]
        assert 0 < b["bytes_read"] <= b["chunk_bytes_touched"] + b["files"] * 2**20
        assert 0 < b["chunks_touched"] <= image["chunks"]
        assert 0 < b["share_chunks_of_content"] <= 1.0 and 0 < b["share_read_of_content"] <= 1.0
        assert 0 < b["share_link_of_compressed"] < 1.5 and _positive(b["seconds"], 600)


def test_fanout(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    fo = r["fanout"]
    assert fo["unique_chunks"] == r["images"]["base"]["chunks"] + 1
    for n, c in fo["by_n"].items():
        n = int(n)
        assert len(c["start_seconds"]) == n and c["start_max_s"] >= c["start_median_s"] > 0
        assert _positive(c["fetch_all_seconds"], 600)
        # the zonal cache was cold: every chunk was read from the region at least once, and at most once per node
        # (plus the node's own foreground/background duplicates)
        assert 0.99 <= c["regional_reads_per_unique_chunk"] <= n + 1
        assert c["regional_reads_total"] >= c["regional_reads_start"] >= 0
        assert 0.9 <= c["link_bytes_per_image_byte"] <= n + 1


def test_tiers(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    t = r["tiers"]
    for tier in TIERS:
        c = t[tier]
        assert c["samples"] == t["sample_chunks"] > 0
        assert 0 < c["p50_ms"] <= c["p99_ms"] < 60_000, tier
        assert _positive(c["throughput_mb_s"]) and _positive(c["throughput_chunks_s"]) and _positive(c["mean_chunk_bytes"])
    # the emulated link adds its round-trip time to every regional fetch
    rtt = r["settings"]["default_link"]["rtt_ms"]
    assert t["regional_via_default_link"]["p50_ms"] >= rtt


def test_warm_reads(quick) -> None:  # type: ignore[no-untyped-def]
    _, r, _ = quick
    w = r["warm_reads"]
    assert w["files"] > 0 and w["bytes"] > 0 and w["block_bytes"] == 4096
    for side in ("fuse", "disk"):
        for kind in ("seq", "rand"):
            for cache in ("dropped", "hot"):
                assert _positive(w[f"{side}_{kind}_{cache}"]["median_mb_s"])
    for kind in ("seq", "rand"):
        for cache in ("dropped", "hot"):
            ratio = w[f"ratio_{kind}_{cache}"]
            assert ratio == pytest.approx(w[f"fuse_{kind}_{cache}"]["median_mb_s"] / w[f"disk_{kind}_{cache}"]["median_mb_s"])


def test_targets_and_report(quick) -> None:  # type: ignore[no-untyped-def]
    out, r, _ = quick
    keys = {t["key"] for t in r["targets"]}
    assert {"cold_vs_pull:python:stream_cold", "flat:python:stream_cold", "bytes:link", "bytes:app", "fanout",
            "warm_seq:dropped"} <= keys
    for t in r["targets"]:
        assert isinstance(t["met"], bool) and isinstance(t["measured"], float) and t["limit"] > 0
        assert t["met"] or t["note"], t["key"]  # a missed target says why
    md = (out / "bench.md").read_text()
    for heading in ("## Targets", "## Cold start to first output", "## Bytes before the first output",
                    "## Tier latency", "## Fan-out", "## Warm reads"):
        assert heading in md
    assert r["charts"]
    for name in r["charts"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md


def test_baselines(quick) -> None:  # type: ignore[no-untyped-def]
    """containerd's pull + run and the stargz peer ran through the same link as imagestream, each to the program's output."""
    out, r, _ = quick
    b = r["baselines"]
    assert b["link"]["rtt_ms"] == r["settings"]["default_link"]["rtt_ms"]
    assert not b["skipped"], f"baselines not built (scripts/peers/build quick): {b['skipped']}"
    assert list(b["by_image"]) == list(b["images"]) == ["base"]  # quick: the base image only
    info = b["images"]["base"]
    assert info["runs"] == 1 and info["command"][:3] == ["python3", "-u", "-c"] and not info["skipped"]
    cells = b["by_image"]["base"]
    assert set(cells) == {"containerd", "estargz", "imagestream_containerd", "imagestream_containerd_profile",
                          "imagestream_run", "imagestream_profile", "imagestream_fallback"}
    for key, c in cells.items():
        assert len(c["samples"]) == 1 and _positive(c["median"], 600), key
        if "pull_s" in c:  # the pull and the run add up to the start
            assert c["pull_s"][0] + c["run_s"][0] == pytest.approx(c["samples"][0]), key
        assert c["link_bytes_median"] > 0, key  # every path fetched over the emulated link
    # containerd pulls the whole gzip layer through the link before it runs; the lazy peer fetches by ranges
    assert cells["containerd"]["link_bytes_median"] >= 0.95 * info["orig_bytes"]
    assert cells["containerd"]["registry_blob_gets_median"] >= 2  # config and layer
    assert cells["estargz"]["registry_gets_median"] >= cells["estargz"]["registry_blob_gets_median"] >= 1
    assert cells["imagestream_run"]["blocking_fetches_median"] > 0
    # the cold paths replay no profile (no snapshotter records one while the baselines run), and the profiled ones do,
    # through containerd too (its snapshotter attaches the second push's name, which has the profile)
    for cold, profiled in (("imagestream_run", "imagestream_profile"),
                           ("imagestream_containerd", "imagestream_containerd_profile")):
        assert cells[profiled]["blocking_fetches_median"] < cells[cold]["blocking_fetches_median"], (cold, profiled)
    fo = b["fanout"]
    assert fo["image"] == "base" and fo["n"] == max(r["settings"]["fanout_n"])
    for key in ("containerd", "estargz", "imagestream_run", "imagestream_profile", "imagestream_containerd",
                "imagestream_containerd_profile"):
        c = fo["by_path"][key]
        assert len(c["start_seconds"]) == fo["n"], key
        assert c["start_max_s"] >= c["start_median_s"] > 0, key
        assert c["link_bytes"] > 0, key  # each of them fetched over the one link
    # every peer node asks the registry itself: containerd's for the config and the layer each, the lazy ones at least once
    assert fo["by_path"]["containerd"]["registry_gets"] >= 2 * fo["n"]
    assert fo["by_path"]["estargz"]["registry_gets"] >= fo["n"]
    targets = {t["name"]: t for t in r["targets"]}
    for name in ("vs_containerd:imagestream_run:base", "vs_containerd:imagestream_containerd:base",
                 "vs_peer:imagestream_run:base", "vs_peer:imagestream_profile:base",
                 "vs_peer:imagestream_containerd_profile:base",
                 "vs_peer_fanout:imagestream_run", "vs_peer_fanout:imagestream_containerd"):
        t = targets[name]
        assert isinstance(t["met"], bool) and t["measured"] > 0 and t["met"] == (t["measured"] <= t["limit"])
    assert targets["vs_peer:imagestream_run:base"]["measured"] == pytest.approx(
        cells["imagestream_run"]["median"] / cells["estargz"]["median"])
    assert targets["vs_peer_fanout:imagestream_containerd"]["measured"] == pytest.approx(
        fo["by_path"]["imagestream_containerd"]["start_median_s"] / fo["by_path"]["estargz"]["start_median_s"])
    md = (out / "bench.md").read_text()
    assert "## Baselines" in md and "### base image" in md and "](baselines.png)" in md


def test_stack_is_left_as_it_was(quick) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local

    _, _, stdout = quick
    assert all(p["ready"] for p in local.status())
    assert "bench/" not in run_cli("images").stdout
    netns = stdout.split("link: netns ", 1)[1].split()[0].rstrip(",")
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
