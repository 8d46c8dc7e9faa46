"""The local stack's backend credentials: made once per stack home, kept in files only its owner can read.

`$IMAGESTREAM_HOME/secrets/` (0700) holds one password per file (0600), made from os.urandom on the first
`stack up`:

| file | who uses it |
|---|---|
| `redis-zonal-cache` | the zonal cache, as Redis ACL user `zonal-cache` (chunk keys; GET, SET, EXISTS, DEL) |
| `redis-admin` | the stack's own tooling (readiness, emptying the caches, tests), as ACL user `admin` |
| `cassandra-admin` | the schema step (`python -m chunk_store.schema`), the superuser that replaces `cassandra` |
| `cassandra-chunk-store` | the regional store, as role `chunk_store` (SELECT, MODIFY on its keyspace) |
| `jmx` | nodetool, over JMX on loopback ("user password", the JVM's password file format) |

Passwords never appear on a command line: Redis reads them from its configuration file (0600), Cassandra's
JMX from its password file, the services from the files above (IMAGESTREAM_*_PASSWORD_FILE).
"""

from __future__ import annotations

import os
import pathlib
import secrets

from imagestream import config

REDIS_ADMIN = "admin"
JMX_USER = "nodetool"
# What the zonal cache does with Redis (zonal_cache/redis_backend.py), and nothing else: its keys only,
# no CONFIG SET, FLUSHALL, KEYS, DEBUG, MODULE, SCRIPT... (CONFIG GET: it checks the eviction policy)
ZONAL_CACHE_ACL = "resetkeys ~chunk:* resetchannels -@all +get +set +exists +del +ping +select +config|get"


def secrets_dir() -> pathlib.Path:
    return config.home() / "secrets"


def _write_private(path: pathlib.Path, text: str) -> None:
    """Write a file only its owner can read, created so (no moment of a wider mode), replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def password(name: str) -> str:
    """The password in secrets/NAME, made on first use."""
    folder = secrets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / name
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def ensure() -> None:
    """Every password of the stack, made if missing."""
    for name in ("redis-zonal-cache", "redis-admin", "cassandra-admin", "cassandra-chunk-store"):
        password(name)
    jmx_password_file()


# -- Redis -------------------------------------------------------------------------------------------

def redis_acl() -> list[str]:
    """Redis `user` directives: the default user off, the zonal cache's user, the tooling's user."""
    return [
        "user default off resetpass resetkeys -@all",  # no login; no protected-mode exemption either
        f"user {config.get('redis_username')} on >{password('redis-zonal-cache')} {ZONAL_CACHE_ACL}",
        f"user {REDIS_ADMIN} on >{password('redis-admin')} ~* &* +@all",
    ]


def write_redis_config(path: pathlib.Path, settings: list[tuple[str, str]]) -> None:
    lines = [f"{key} {value}" for key, value in settings] + redis_acl()
    _write_private(path, "# written by imagestream_dev.stack (0600: it holds passwords)\n" + "\n".join(lines) + "\n")


def redis_admin():  # type: ignore[no-untyped-def]
    """A (sync) Redis client logged in as the stack's admin user: for tooling and tests, not for services."""
    import redis

    return redis.Redis.from_url(config.get("redis_url"), username=REDIS_ADMIN, password=password("redis-admin"))


# -- Cassandra ---------------------------------------------------------------------------------------

def jmx_password_file() -> pathlib.Path:
    """The JMX password file (also nodetool's --password-file), and its access file beside it."""
    path = secrets_dir() / "jmx"
    if not path.exists():
        _write_private(path, f"{JMX_USER} {secrets.token_urlsafe(32)}\n")
    access = secrets_dir() / "jmx.access"
    if not access.exists():
        _write_private(access, f"{JMX_USER} readwrite\n")
    return path


def cassandra_admin(hosts: list[str] | None = None, port: int | None = None):  # type: ignore[no-untyped-def]
    """A driver Cluster (with `.session`) logged in as the stack's Cassandra superuser: for tooling and tests."""
    from chunk_store import schema

    return schema.connect(hosts or config.parse_list(config.get("cassandra_hosts")),
                          port or int(config.get("cassandra_port")),
                          config.get("cassandra_admin_username"), password("cassandra-admin"))


def schema_env() -> dict[str, str]:
    """The schema step's settings: the stack's password files."""
    return {config.SETTINGS[s].env: str(config.secret_file(s))
            for s in ("cassandra_admin_password_file", "cassandra_password_file")}
