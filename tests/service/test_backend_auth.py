"""The stack's backends let in only who they must: the real Redis and Cassandra of the session's stack.

Redis: no default user; the zonal cache's ACL user reaches chunk keys with the commands it uses, nothing
else. Cassandra: password logins, the default superuser gone, the chunk store's role limited to rows of its
keyspace. JMX (nodetool) asks for a login. Every listener of the stack is on loopback; no password is on a
command line.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

from imagestream import config


def _redis(**login):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(config.get("redis_url"), socket_timeout=5, **login)


def test_redis_refuses_a_client_without_a_login(stack) -> None:  # type: ignore[no-untyped-def]
    import redis

    client = _redis()
    with pytest.raises(redis.exceptions.AuthenticationError, match="NOAUTH|authenticated"):
        client.get("chunk:anything")
    with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off, whatever the password
        _redis(username="default", password="").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        _redis(username=config.get("redis_username"), password="wrong").ping()


def test_the_zonal_cache_user_reaches_chunk_keys_only(stack) -> None:  # type: ignore[no-untyped-def]
    import redis

    zonal = _redis(username=config.get("redis_username"),
                   password=config.read_secret("redis_password_file"))
    assert zonal.set("chunk:auth-test:1", b"x") and zonal.get("chunk:auth-test:1") == b"x"
    assert zonal.delete("chunk:auth-test:1") == 1
    for forbidden in (lambda: zonal.flushall(), lambda: zonal.config_set("maxmemory", "0"),
                      lambda: zonal.keys("*"), lambda: zonal.set("other:key", b"x"),
                      lambda: zonal.execute_command("ACL", "LIST"), lambda: zonal.execute_command("CLIENT", "LIST")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()


def test_redis_reads_its_passwords_from_a_private_file_not_its_command_line(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local

    conf = config.home() / "redis" / "redis.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert "protected-mode yes" in conf.read_text() and "--protected-mode" not in conf.read_text()
    cmdline = pathlib.Path(f"/proc/{local.running_pid('redis')}/cmdline").read_bytes().decode()
    for name in ("redis-zonal-cache", "redis-admin"):
        assert config.read_secret("redis_password_file", str(config.home() / "secrets" / name)) not in cmdline
    assert (config.home() / "secrets").stat().st_mode & 0o777 == 0o700


def _cassandra(username: str | None, password: str | None):  # type: ignore[no-untyped-def]
    from chunk_store import schema

    return schema.connect(config.parse_list(config.get("cassandra_hosts")), int(config.get("cassandra_port")),
                          username, password)


def test_cassandra_refuses_a_client_without_a_login_and_the_default_superuser(stack) -> None:  # type: ignore[no-untyped-def]
    from chunk_store.schema import LoginRefused

    with pytest.raises(LoginRefused, match="requires authentication"):
        _cassandra(None, None)
    with pytest.raises(LoginRefused, match="incorrect"):
        _cassandra("cassandra", "cassandra")
    with pytest.raises(LoginRefused):
        _cassandra(config.get("cassandra_username"), "not-the-password")


def test_the_chunk_store_role_only_reads_and_writes_rows_of_its_keyspace(stack) -> None:  # type: ignore[no-untyped-def]
    """SELECT and MODIFY on its keyspace (Cassandra's MODIFY includes TRUNCATE: it cannot be split off)."""
    from cassandra import Unauthorized

    from imagestream_dev.stack import credentials

    ks = config.get("cassandra_keyspace")
    admin = credentials.cassandra_admin()
    try:  # another tenant's keyspace, beside the regional store's
        admin.session.execute("CREATE KEYSPACE IF NOT EXISTS auth_other WITH replication ="
                              " {'class': 'NetworkTopologyStrategy', 'dc1': 1}")
        admin.session.execute("CREATE TABLE IF NOT EXISTS auth_other.t (k text PRIMARY KEY)")
        admin.control_connection.wait_for_schema_agreement()
    finally:
        admin.shutdown()
    role = _cassandra(config.get("cassandra_username"), config.read_secret("cassandra_password_file"))
    try:
        s = role.session
        # what it needs works (the control that the denials below are about permissions, not a broken login)
        s.execute(f"INSERT INTO {ks}.tags (repository, tag, digest) VALUES ('auth-test', 't', 'd')")
        assert s.execute(f"SELECT digest FROM {ks}.tags WHERE repository = 'auth-test' AND tag = 't'").one().digest == "d"
        s.execute(f"DELETE FROM {ks}.tags WHERE repository = 'auth-test' AND tag = 't'")
        allowed = []
        for statement in (
            "DROP KEYSPACE auth_other",
            "SELECT * FROM auth_other.t",
            "INSERT INTO auth_other.t (k) VALUES ('x')",
            f"DROP TABLE {ks}.chunks",
            f"DROP KEYSPACE {ks}",
            f"ALTER TABLE {ks}.images ADD evil text",
            f"CREATE TABLE {ks}.evil (k text PRIMARY KEY)",
            "CREATE KEYSPACE evil WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 1}",
            "CREATE ROLE evil WITH SUPERUSER = true AND LOGIN = true AND PASSWORD = 'x'",
            f"GRANT ALL PERMISSIONS ON ALL KEYSPACES TO {config.get('cassandra_username')}",
            f"ALTER ROLE {config.get('cassandra_admin_username')} WITH PASSWORD = 'x'",
            "SELECT * FROM system_auth.roles",
        ):
            try:
                s.execute(statement)
            except Unauthorized:
                continue
            allowed.append(statement)
        assert allowed == []
    finally:
        role.shutdown()


def test_nodetool_needs_the_jmx_login(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import cassandra, local

    assert local.nodetool(0, "version", timeout_s=120).returncode == 0
    node = local.cassandra_nodes()[0]
    anonymous = subprocess.run(
        [cassandra.find_java(), "-Xmx128m", *cassandra._JPMS_FLAGS, "-cp", f"{node.node_dir / 'lib'}/*",
         "-Dlogback.configurationFile=" + cassandra._uri(node.conf_dir / "logback.xml"),
         f"-Dcassandra.logdir={node.log_dir}", "org.apache.cassandra.tools.NodeTool", "-h", "127.0.0.1", "-p", str(node.jmx_port), "version"],
        capture_output=True, text=True, timeout=120)
    assert anonymous.returncode != 0
    assert re.search(r"[Cc]redentials|[Aa]uthentication", anonymous.stdout + anonymous.stderr)


def _listeners(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process `pid` (and its threads) listens on."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                found.append(fields[1])
    return found


def _address(hex_address: str) -> str:
    import ipaddress

    host = hex_address.split(":")[0]
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(address.ipv4_mapped or address)


def test_every_listener_of_the_stack_is_on_loopback(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local

    seen = {}
    for row in local.status():
        if row["pid"] is None:
            continue
        addresses = {_address(a) for a in _listeners(row["pid"])}
        seen[row["name"]] = addresses
        wide = [a for a in addresses if a not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert not wide, f"{row['name']} listens on {wide}"
    # the backends of the brief are there and were looked at
    for name in ("redis", "cassandra", "zipkin", "chunk_store", "zonal_cache"):
        assert seen.get(name), f"{name}: no listening socket found ({seen})"


def test_the_chunks_table_leaves_repair_to_the_checked_path(stack) -> None:  # type: ignore[no-untyped-def]
    """No read repair on chunks: Cassandra would reconcile a bad copy with the same timestamp by value and
    could copy it onto a good replica; the regional store heals through its digest check instead."""
    from imagestream_dev.stack import credentials

    admin = credentials.cassandra_admin()
    try:
        row = admin.session.execute("SELECT read_repair FROM system_schema.tables WHERE keyspace_name = %s AND "
                                    "table_name = 'chunks'", (config.get("cassandra_keyspace"),)).one()
    finally:
        admin.shutdown()
    assert row.read_repair == "NONE"
