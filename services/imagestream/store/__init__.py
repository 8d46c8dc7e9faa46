"""One chunk-store interface, served and composed by every tier.

A tier is wiring: e.g. the node cache is
``ReadThrough(Memory, ReadThrough(Verified(Disk), Verified(Failover([zonal, regional]))))``.
See `base.ChunkStore` for the contract.
"""

from imagestream.store.base import ChunkStore, Stats
from imagestream.store.memory import MemoryStore
from imagestream.store.composed import CoalescingStore, FailoverStore, ReadThroughStore, VerifiedStore

__all__ = [
    "ChunkStore",
    "Stats",
    "MemoryStore",
    "ReadThroughStore",
    "FailoverStore",
    "CoalescingStore",
    "VerifiedStore",
]
