"""Chunks in Redis (through redis.asyncio, the maintained successor of aioredis).

Redis bounds itself: the zonal cache expects `maxmemory` with an LRU policy
(`allkeys-lru`) and warns at start-up when Redis is not set that way, since an
unbounded cache would eventually refuse writes or be killed.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from imagestream.digests import Digest
from imagestream.errors import NotFound, Unavailable
from imagestream.store.base import ChunkStore

log = logging.getLogger(__name__)


class RedisChunkStore(ChunkStore):
    name = "redis"

    def __init__(self, url: str, prefix: str = "chunk:", username: str | None = None,
                 password: str | None = None) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        # the ACL user's password comes from a file (config.read_secret), never inside the URL
        self.client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                              username=username if password else None, password=password)

    def _key(self, digest: Digest) -> str:
        return f"{self.prefix}{digest.hash}:{digest.size}"

    async def check_eviction_policy(self) -> dict[str, str]:
        """Redis's maxmemory settings; logs a warning when the cache would not be bounded."""
        try:
            settings = await self.client.config_get("maxmemory*")
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e
        settings = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                    for k, v in settings.items()}
        if settings.get("maxmemory", "0") == "0" or "lru" not in settings.get("maxmemory-policy", ""):
            log.warning("redis %s is not bounded with an LRU policy (maxmemory=%s, maxmemory-policy=%s)",
                        self.url, settings.get("maxmemory"), settings.get("maxmemory-policy"))
        return settings

    async def get(self, digest: Digest) -> bytes:
        try:
            data = await self.client.get(self._key(digest))
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e
        if data is None:
            self.stats.misses += 1
            raise NotFound(f"chunk {digest.short} not in redis")
        self.stats.hits += 1
        self.stats.bytes_served += len(data)
        return data

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        try:
            return bool(await self.client.set(self._key(digest), compressed, nx=True))
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e

    async def contains(self, digest: Digest) -> bool:
        try:
            return bool(await self.client.exists(self._key(digest)))
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e

    async def find_missing(self, digests):  # type: ignore[no-untyped-def]
        digests = list(dict.fromkeys(digests))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for d in digests:
                    pipe.exists(self._key(d))
                present = await pipe.execute()
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e
        return [d for d, here in zip(digests, present) if not here]

    async def delete(self, digest: Digest) -> None:
        try:
            await self.client.delete(self._key(digest))
        except RedisError as e:
            raise Unavailable(f"redis {self.url}: {e}") from e

    async def close(self) -> None:
        await self.client.aclose()
