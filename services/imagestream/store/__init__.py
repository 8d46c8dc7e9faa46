"""One chunk-store interface, served and composed by every tier.

A tier is wiring: e.g. the node cache is
``ReadThrough(Memory, ReadThrough(Verified(Disk), NodeFetcher(Failover([Verified(zonal), Verified(regional)]))))``.
See `base.ChunkStore` for the contract; decorators build on `base.DelegatingStore`.
"""

from imagestream.store.base import ChunkStore, DelegatingStore, Stats
from imagestream.store.memory import MemoryStore
from imagestream.store.composed import CoalescingStore, FailoverStore, ReadThroughStore, VerifiedStore

__all__ = [
    "ChunkStore",
    "DelegatingStore",
    "Stats",
    "MemoryStore",
    "ReadThroughStore",
    "FailoverStore",
    "CoalescingStore",
    "VerifiedStore",
]
