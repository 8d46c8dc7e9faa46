"""The regional store on three Cassandra nodes, replication 3, LOCAL_QUORUM: one node killed during cold
reads and during a push loses nothing; the node comes back and is repaired; a replica's bad copy heals."""

from __future__ import annotations

import threading
import time

import pytest

from fuse_client import mounts
from imagestream import config
from imagestream_dev.stack import local

from tests.replicated.tools import (Reads, drop_page_cache, in_thread, lost_images, make_image, push_in_background,
                                 read_all, regional, scrub_reaching_every_replica, wait_for_upload)
from tests.conftest import needs_fuse, run_cli

pytestmark = [pytest.mark.replicated, needs_fuse]


def _status_nodes(want: list[str] | None = None, timeout: float = 180) -> list[str]:
    """The nodes' states as `nodetool status` says them (waiting up to `timeout` for `want`: gossip takes a while)."""
    deadline = time.monotonic() + timeout
    while True:
        out = local.nodetool(0, "status").stdout
        states = [line.split()[0] for line in out.splitlines() if line[:2] in ("UN", "DN", "UJ", "UL", "DL", "UM")]
        if want is None or states == want or time.monotonic() > deadline:
            return states
        time.sleep(2)


def test_three_nodes_up_and_the_keyspace_replicated_three_ways(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import credentials

    assert _status_nodes(["UN", "UN", "UN"]) == ["UN", "UN", "UN"]
    cluster = credentials.cassandra_admin()
    try:
        row = cluster.session.execute("SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
                                        (config.get("cassandra_keyspace"),)).one()
    finally:
        cluster.shutdown()
    assert row.replication["dc1"] == "3" and row.replication["class"].endswith("NetworkTopologyStrategy")


def test_a_node_killed_during_cold_reads_and_a_push_loses_nothing_and_repair_brings_it_back(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout, expected, _ = make_image(tmp_path, seed=1)
    run_cli("push", "-q", str(layout), "cluster/reads")
    local.empty_caches()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("cluster/reads", mnt, download=False)
    try:
        reads = Reads()
        started = threading.Event()
        thread, _ = in_thread(read_all, mnt, expected, reads, started, 10)
        started.wait(120)
        stack.kill("cassandra-2")  # mid-way through the cold reads
        thread.join(600)
        assert (reads.done, reads.failed, reads.wrong) == (len(expected), 0, 0), reads.errors[:5]
    finally:
        mounts.unmount(mnt)

    # a push while the node is down: its writes reach two replicas of three (quorum), and hints for the third
    layout2, expected2, chunks2 = make_image(tmp_path, seed=2)
    proc = push_in_background(layout2, "cluster/pushed")
    wait_for_upload(proc, chunks2)
    proc.wait(600)
    assert proc.returncode == 0, proc.communicate()
    assert lost_images(["cluster/reads", "cluster/pushed"]) == []

    stack.start("cassandra-2")
    assert _status_nodes(["UN", "UN", "UN"]) == ["UN", "UN", "UN"]
    started_repair = time.monotonic()
    repair = local.nodetool(1, "repair", "--full", config.get("cassandra_keyspace"))
    print(f"nodetool repair: {time.monotonic() - started_repair:.1f} s")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    # the repaired node now holds what was written while it was down: with another node gone, a
    # quorum (the repaired node and the third) still reads every image
    stack.kill("cassandra")
    try:
        local.empty_caches()
        assert lost_images(["cluster/reads", "cluster/pushed"]) == []
        mounts.mount("cluster/pushed", mnt, download=False)
        try:
            drop_page_cache()
            reads = read_all(mnt, expected2, Reads())
            assert (reads.failed, reads.wrong) == (0, 0), reads.errors[:5]
        finally:
            mounts.unmount(mnt)
    finally:
        stack.start("cassandra")


def _flush_all() -> None:
    for i in range(3):
        result = local.nodetool(i, "flush", config.get("cassandra_keyspace"), "chunks")
        assert result.returncode == 0, result.stderr


def _data_files(i: int) -> list:  # type: ignore[type-arg]
    node = local.cassandra_nodes()[i]
    return sorted((node.data_dir / "data" / config.get("cassandra_keyspace")).glob("chunks-*/*Data.db"))


def test_a_bad_copy_on_one_replica_is_never_served_and_scrub_heals_it(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagestream.digests import Digest, compress

    raw = b"one replica's copy goes bad " * 20_000
    digest, good = Digest.of(raw), compress(raw)

    regional(lambda store: store.put(digest, good))
    _flush_all()
    # flip bytes of the stored copy on node 3's disk, while it is down (Cassandra reads the file as it is)
    stack.kill("cassandra-3")  # what is flushed is on disk: the file is changed under a node that is down
    flipped = 0
    for path in _data_files(2):
        data = bytearray(path.read_bytes())
        at = data.find(good)
        if at >= 0:
            middle = at + len(good) // 2
            data[middle] = 0xFF if data[middle] != 0xFF else 0xFE  # the larger value: wins a reconciliation
            path.write_bytes(bytes(data))
            flipped += 1
    assert flipped == 1
    stack.start("cassandra-3")

    assert all(regional(lambda store: store.get(digest)) == good for _ in range(10))  # never the bad copy
    scrubbed = scrub_reaching_every_replica()
    assert scrubbed.returncode == 0, scrubbed.stdout
    assert "1 corrupt, 1 healed" in scrubbed.stdout or " 0 corrupt" in scrubbed.stdout, scrubbed.stdout
    # healed either by a read that met the bad copy or by the scrub; either way, every replica is good now
    again = run_cli("scrub")
    assert " 0 corrupt" in again.stdout, again.stdout
    listed = run_cli("scrub", "--list").stdout
    assert f"{digest}  healed" in listed
    # the bad copy, shadowed, leaves node 3's file at its next compaction; then a repair streams it again
    assert local.nodetool(2, "compact", config.get("cassandra_keyspace"), "chunks").returncode == 0
    repair = local.nodetool(2, "repair", "--full", config.get("cassandra_keyspace"))
    assert repair.returncode == 0, repair.stdout + repair.stderr
