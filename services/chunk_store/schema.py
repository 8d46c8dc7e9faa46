"""The regional store's keyspace, tables and Cassandra roles: an administrator's step, not the service's.

`python -m chunk_store.schema` logs in as the superuser (IMAGESTREAM_CASSANDRA_ADMIN_USERNAME, password from
IMAGESTREAM_CASSANDRA_ADMIN_PASSWORD_FILE). On a new cluster that role does not exist yet: the step logs in
once as Cassandra's default superuser (cassandra/cassandra), makes the superuser with the password from its
file, and drops the default role, so that no well-known password opens the cluster. Then, every run:

* `system_auth` is replicated like the keyspace (NetworkTopologyStrategy): with the default (one replica), the
  node holding a role's row is a single point of failure of every login;
* the keyspace, its tables, and the columns added since a store was first made;
* the service's role (IMAGESTREAM_CASSANDRA_USERNAME, LOGIN, password from its file, set again on every run so
  that a new file rotates it) with SELECT and MODIFY on the keyspace and nothing else: it cannot create,
  alter or drop a table or keyspace, nor read or grant roles.

The chunk store itself only checks that the schema is there (`check`). Every step is idempotent.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from imagestream import config
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DEFAULT_SUPERUSER = ("cassandra", "cassandra")

TABLES = {
    # used_at: when a push last wrote the chunk or found it stored (ms), what gc's grace period reads;
    # stored_bytes: the frame's length, written with the data (a row without it holds no chunk)
    "chunks": "hash text, size bigint, data blob, used_at bigint, stored_bytes int, PRIMARY KEY ((hash, size)))"
              " WITH compression = {'enabled': 'false'}",  # chunks are already zstd frames
    "images": "name text PRIMARY KEY, index_hash text, index_size bigint, source_digest text,"
              " content_bytes bigint, chunk_count bigint, published_at bigint,"
              " profile_hash text, profile_size bigint, streaming_disabled boolean, manifest_digest text)",
    # chunks found not to match their digest: kept (never deleted on a failed check), recorded here
    "quarantine": "hash text, size bigint, found_at bigint, reason text, bad_sha256 text, healed boolean,"
                  " PRIMARY KEY ((hash, size)))",
    # mount leases (chunk_store/gc.py): a row per (holder, index), gone by itself when its TTL runs out
    "leases": "holder text, index_hash text, index_size bigint, image text, expires_at bigint,"
              " PRIMARY KEY ((holder), index_hash, index_size))",
    # the OCI Distribution side (chunk_store/distribution/cassandra_blobs.py)
    "blobs": "digest text PRIMARY KEY, size bigint, media_type text, pieces blob, used_at bigint)",
    "tags": "repository text, tag text, digest text, PRIMARY KEY ((repository), tag))",
    # pull-through conversion (chunk_store/mirror.py): the upstreams the OCI endpoint fronts, with their logins,
    # and one row per image converted from one, claimed and updated only by lightweight transactions
    "mirrors": "prefix text PRIMARY KEY, upstream text, plain_http boolean, ca_pem text, username text,"
               " password text, added_at bigint)",
    "conversions": "name text PRIMARY KEY, upstream text, state text, owner text, heartbeat bigint, percent int,"
                   " error text, updated_at bigint)",
}
# columns added since a table was first made: a store created by an older version gains them
ADDED_COLUMNS = {
    "images": (("profile_hash", "text"), ("profile_size", "bigint"), ("streaming_disabled", "boolean"),
               ("manifest_digest", "text")),
    "chunks": (("used_at", "bigint"), ("stored_bytes", "int")),
    "blobs": (("used_at", "bigint"),),
}

# Table options set on every run of the schema step, on new and existing tables alike.
# chunks: no read repair. A copy changed on a replica's disk keeps its write timestamp, and a quorum read
# that met it would reconcile equal timestamps by the larger value and could write the bad copy onto a good
# replica. Every reader checks chunks against their digests, and the regional store heals a bad copy by
# writing a good one with a new timestamp (chunk_store/healing.py): repair goes through that checked path.
TABLE_OPTIONS: dict[str, str] = {
    "chunks": "read_repair = 'NONE'",
}

# what the service's role may do on its keyspace: read and write rows, conditional updates included
SERVICE_PERMISSIONS = ("SELECT", "MODIFY")


def connect(hosts: list[str], port: int, username: str | None, password: str | None,
            local_dc: str | None = None, timeout_s: float = 20) -> Any:
    """A driver Cluster logged in as `username` (None: no credentials), or Unavailable naming why not."""
    from cassandra import AuthenticationFailed, ProtocolVersion
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=local_dc)) if local_dc else None
    profile = ExecutionProfile(request_timeout=timeout_s, **({"load_balancing_policy": policy} if policy else {}))
    cluster = Cluster(hosts, port=port, protocol_version=ProtocolVersion.V5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=10,
                      auth_provider=PlainTextAuthProvider(username, password) if password is not None else None)
    try:
        cluster.session = cluster.connect()
    except NoHostAvailable as e:
        cluster.shutdown()
        errors = list(e.errors.values())
        if errors and all(isinstance(x, AuthenticationFailed) for x in errors):
            raise LoginRefused(f"cassandra {','.join(hosts)}:{port}: login as {username!r} refused: {errors[0]}") from None
        raise Unavailable(f"cassandra {','.join(hosts)}:{port}: {e}") from None
    return cluster


class LoginRefused(Unavailable):
    pass


def parse_replication(text: str) -> dict[str, int]:
    """'dc1:3,dc2:3' -> {'dc1': 3, 'dc2': 3}"""
    out: dict[str, int] = {}
    for part in text.split(","):
        dc, _, factor = part.strip().partition(":")
        if not dc or not factor.isdigit() or int(factor) < 1:
            raise InvalidArgument(f"replication {text!r}: want 'dc:factor[,dc:factor...]', e.g. 'dc1:3'")
        out[dc] = int(factor)
    return out


def _replication(replication: dict[str, int]) -> str:
    return ", ".join(["'class': 'NetworkTopologyStrategy'", *(f"'{dc}': {n}" for dc, n in sorted(replication.items()))])


def admin_cluster(hosts: list[str], port: int, admin: str, admin_password: str, timeout_s: float = 180) -> Any:
    """Logged in as the superuser `admin`, made first (and the default superuser dropped) on a new cluster.

    A node just started may time out or not have made its default superuser yet: tried until `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return connect(hosts, port, admin, admin_password)
        except LoginRefused:
            try:
                bootstrap = connect(hosts, port, *DEFAULT_SUPERUSER)
                break
            except LoginRefused:
                if time.monotonic() > deadline:
                    raise LoginRefused(f"cassandra {','.join(hosts)}:{port}: neither {admin!r} (password from its file)"
                                       f" nor the default superuser can log in: is the admin password file the one"
                                       f" the cluster was set up with?") from None
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
        except Unavailable:
            if time.monotonic() > deadline:
                raise
        time.sleep(2)
    try:
        log.info("new cluster: making superuser %s, dropping the default superuser", admin)
        bootstrap.session.execute(f"CREATE ROLE IF NOT EXISTS {_ident(admin)} WITH SUPERUSER = true AND LOGIN = true"
                                  " AND PASSWORD = %s", (admin_password,))
    finally:
        bootstrap.shutdown()
    cluster = connect(hosts, port, admin, admin_password)
    if admin != DEFAULT_SUPERUSER[0]:
        cluster.session.execute(f"DROP ROLE IF EXISTS {DEFAULT_SUPERUSER[0]}")
    return cluster


def _ident(name: str) -> str:
    import re

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,47}", name):
        raise InvalidArgument(f"Cassandra name {name!r}: want a lower-case identifier")
    return name


def setup(session: Any, keyspace: str, replication: dict[str, int], role: str, role_password: str) -> None:
    """Keyspace, tables, system_auth replication and the service's role (see the module's doc). Idempotent."""
    from cassandra import ConsistencyLevel
    from cassandra.query import SimpleStatement

    ks, role = _ident(keyspace), _ident(role)
    session.execute(f"ALTER KEYSPACE system_auth WITH replication = {{{_replication(replication)}}}")
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{_replication(replication)}}}")
    for table, columns in TABLES.items():
        session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.{table} ({columns}")
    for table, added in ADDED_COLUMNS.items():
        have = {row.column_name for row in session.execute(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s AND table_name = %s", (ks, table))}
        for column, kind in added:
            if column not in have:
                session.execute(f"ALTER TABLE {ks}.{table} ADD {column} {kind}")
    for table, options in TABLE_OPTIONS.items():
        session.execute(f"ALTER TABLE {ks}.{table} WITH {options}")
    session.execute(f"CREATE ROLE IF NOT EXISTS {role} WITH LOGIN = true AND PASSWORD = %s", (role_password,))
    try:  # a new password file rotates the password (Cassandra allows a change every few seconds only)
        connect(session.cluster.contact_points, session.cluster.port, role, role_password).shutdown()
    except LoginRefused:
        session.execute(f"ALTER ROLE {role} WITH PASSWORD = %s AND LOGIN = true", (role_password,))
    for permission in SERVICE_PERMISSIONS:
        session.execute(f"GRANT {permission} ON KEYSPACE {ks} TO {role}")
    # Rows of system_auth written before its replication grew are on one node: read at ALL, which repairs
    # them onto every replica, so that any node can check any login.
    for table in ("roles", "role_permissions", "role_members"):
        session.execute(SimpleStatement(f"SELECT * FROM system_auth.{table}", consistency_level=ConsistencyLevel.ALL))
    session.cluster.control_connection.wait_for_schema_agreement()


def check(cluster: Any, keyspace: str) -> None:
    """The service's start: the keyspace and its tables must have been made by the schema step."""
    meta = cluster.metadata.keyspaces.get(keyspace)
    missing = [t for t in TABLES if meta is None or t not in meta.tables]
    if meta is None or missing:
        what = f"keyspace {keyspace!r}" if meta is None else f"tables {', '.join(missing)} of keyspace {keyspace!r}"
        raise FailedPrecondition(f"{what} not found: run the schema step first (python -m chunk_store.schema)")
    for table, added in ADDED_COLUMNS.items():
        if any(c not in meta.tables[table].columns for c, _ in added):
            raise FailedPrecondition(f"table {keyspace}.{table} lacks newer columns: run python -m chunk_store.schema")


SETTINGS = ("cassandra_hosts", "cassandra_port", "cassandra_keyspace", "cassandra_replication",
            "cassandra_username", "cassandra_password_file", "cassandra_admin_username",
            "cassandra_admin_password_file")


def run(values: dict[str, str]) -> None:
    admin_password = config.read_secret("cassandra_admin_password_file", values["cassandra_admin_password_file"])
    password = config.read_secret("cassandra_password_file", values["cassandra_password_file"])
    if admin_password is None or password is None:
        missing = "cassandra_admin_password_file" if admin_password is None else "cassandra_password_file"
        raise InvalidArgument(f"{config.SETTINGS[missing].env}: no password file ({config.secret_file(missing)})")
    cluster = admin_cluster(config.parse_list(values["cassandra_hosts"]), int(values["cassandra_port"]),
                            _ident(values["cassandra_admin_username"]), admin_password)
    try:
        setup(cluster.session, values["cassandra_keyspace"], parse_replication(values["cassandra_replication"]),
              values["cassandra_username"], password)
    except Exception as e:
        if type(e).__module__.startswith("cassandra"):  # refused or failed statements: one line, no traceback
            raise Unavailable(f"cassandra: {type(e).__name__}: {e}") from None
        raise
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chunk_store.schema", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, *SETTINGS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)  # its errors come back as one line below
    try:
        run(vars(args))
    except ImagestreamError as e:
        sys.exit(f"chunk_store.schema: {e}")
    print(f"schema of keyspace {args.cassandra_keyspace} and role {args.cassandra_username}: ready")


if __name__ == "__main__":
    main()
