"""The snapshotter's records, in SQLite (one file under the snapshotter's root; survives restarts).

One row per snapshot, keyed by its key (an active or view snapshot) or its name
(a committed one), as containerd's own snapshotters keep them. A snapshot's
files live in `snapshots/<id>/fs` (and `work` for overlay); a layer of a
streamed image has none: its row says which image it belongs to instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sqlite3
import time

from imagestream.snapshot_labels import StreamedLayer
from imagestream.digests import parse as parse_digest

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # the API's Kind numbers
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}


@dataclasses.dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    size: int = 0
    inodes: int = 0
    streamed: StreamedLayer | None = None  # a layer of a streamed image: no files of its own
    image_index: str = ""  # active/view on a streamed image: that image's index hash (it uses the image's mount)

    def fields(self) -> dict[str, object]:
        """What filters match on."""
        return {"name": self.key, "parent": self.parent, "kind": KIND_NAMES[self.kind], "labels": self.labels}


def _streamed_json(s: StreamedLayer | None) -> str | None:
    if s is None:
        return None
    return json.dumps({"image": s.image, "index": [s.index.hash, s.index.size], "position": s.position,
                       "count": s.count, "blob": s.blob})


def _streamed(text: str | None) -> StreamedLayer | None:
    if not text:
        return None
    d = json.loads(text)
    return StreamedLayer(d["image"], parse_digest(d["index"][0], d["index"][1]), d["position"], d["count"],
                         d.get("blob", ""))


class Metadata:
    def __init__(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit; `transaction()` groups writes
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS snapshots ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE NOT NULL, parent TEXT NOT NULL,"
            " kind INTEGER NOT NULL, labels TEXT NOT NULL, created_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL,"
            " size INTEGER NOT NULL DEFAULT 0, inodes INTEGER NOT NULL DEFAULT 0, streamed TEXT,"
            " image_index TEXT NOT NULL DEFAULT '')"
        )

    def close(self) -> None:
        self.db.close()

    def _row(self, row: tuple) -> Snapshot:
        id_, key, parent, kind, labels, created, updated, size, inodes, streamed, image_index = row
        return Snapshot(id_, key, parent, kind, json.loads(labels), created, updated, size, inodes,
                        _streamed(streamed), image_index)

    _COLUMNS = "id, key, parent, kind, labels, created_ns, updated_ns, size, inodes, streamed, image_index"

    def get(self, key: str) -> Snapshot | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[Snapshot]:
        return [self._row(r) for r in self.db.execute(f"SELECT {self._COLUMNS} FROM snapshots ORDER BY id")]

    def children(self, key: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM snapshots WHERE parent = ?", (key,))]

    def users_of_image(self, index_hash: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM snapshots WHERE image_index = ? AND kind != ?",
                                              (index_hash, COMMITTED))]

    def images_in_use(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT image_index FROM snapshots WHERE image_index != ''"
                                              " AND kind != ?", (COMMITTED,))}

    def add(self, key: str, parent: str, kind: int, labels: dict[str, str], streamed: StreamedLayer | None = None,
            image_index: str = "") -> Snapshot:
        now = time.time_ns()
        cursor = self.db.execute(
            "INSERT INTO snapshots (key, parent, kind, labels, created_ns, updated_ns, streamed, image_index)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, parent, kind, json.dumps(labels, sort_keys=True), now, now, _streamed_json(streamed), image_index),
        )
        snapshot = self.get(key)
        assert snapshot is not None and snapshot.id == cursor.lastrowid
        return snapshot

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        self.db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?, updated_ns = ?, image_index = ''"
            " WHERE key = ?",
            (name, COMMITTED, json.dumps(labels, sort_keys=True), size, inodes, time.time_ns(), key),
        )
        snapshot = self.get(name)
        assert snapshot is not None
        return snapshot

    def materialized(self, key: str, size: int, inodes: int) -> None:
        """A streamed layer now has its files: it is a plain committed snapshot from here on."""
        self.db.execute("UPDATE snapshots SET streamed = NULL, size = ?, inodes = ?, updated_ns = ? WHERE key = ?",
                        (size, inodes, time.time_ns(), key))

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        self.db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?",
                        (json.dumps(labels, sort_keys=True), time.time_ns(), key))
        snapshot = self.get(key)
        assert snapshot is not None
        return snapshot

    def remove(self, key: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
