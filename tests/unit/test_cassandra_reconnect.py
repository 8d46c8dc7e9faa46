"""The chunk store's Cassandra connection when no node answers: a query that failed on a session another
query has replaced meanwhile runs again on the new one, instead of failing the caller's request."""

from __future__ import annotations

import time

import pytest
from cassandra.cluster import NoHostAvailable

from chunk_store.cassandra_backend import CassandraConnection, Statement
from imagestream.errors import Unavailable


class FakeFuture:
    def __init__(self, outcome) -> None:  # type: ignore[no-untyped-def]
        self.outcome = outcome

    def add_callbacks(self, ok, failed) -> None:  # type: ignore[no-untyped-def]
        self.outcome(ok, failed)


class FakeSession:
    """Answers `rows`, or fails with NoHostAvailable after `before_failing()` (e.g. a reconnect elsewhere)."""

    def __init__(self, rows=None, before_failing=None) -> None:  # type: ignore[no-untyped-def]
        self.rows, self.before_failing, self.queries = rows, before_failing, 0

    def execute_async(self, prepared, params, host=None) -> FakeFuture:  # type: ignore[no-untyped-def]
        self.queries += 1

        def outcome(ok, failed) -> None:  # type: ignore[no-untyped-def]
            if self.rows is not None:
                ok(self.rows)
                return
            if self.before_failing is not None:
                self.before_failing()
            failed(NoHostAvailable("Unable to connect to any servers", {}))

        return FakeFuture(outcome)


class Prepared:
    query_string = "SELECT data FROM ks.chunks WHERE hash = ? AND size = ?"


def connection(session: FakeSession) -> CassandraConnection:
    conn = CassandraConnection.__new__(CassandraConnection)  # no driver: the sessions are fakes
    conn.keyspace, conn.session, conn.cluster = "ks", session, None
    conn._statements, conn._reconnecting = [], None
    conn._last_reconnect = time.monotonic()  # a reconnect just happened: no new one for RECONNECT_EVERY_S
    return conn


STATEMENT = Statement(Prepared.query_string, False, Prepared())


async def test_a_query_failed_on_a_replaced_session_runs_on_the_new_one() -> None:
    new = FakeSession(rows=["row"])
    conn = connection(FakeSession())
    conn.session.before_failing = lambda: setattr(conn, "session", new)  # another query reconnected meanwhile
    assert await conn.execute(STATEMENT, ("h", 1)) == ["row"]
    assert new.queries == 1


async def test_no_node_right_after_a_reconnect_waits_out_the_interval_and_connects_again() -> None:
    conn = connection(FakeSession())
    conn.RECONNECT_EVERY_S = 0.3
    new = FakeSession(rows=["row"])

    class Cluster:
        session = new

        class metadata:  # noqa: N801 - the driver's attribute
            @staticmethod
            def all_hosts() -> list:  # type: ignore[type-arg]
                class Host:
                    endpoint = "cassandra:9042"

                return [Host()]

        def shutdown(self) -> None:
            pass

    conn.cluster = Cluster()
    conn._connect = Cluster
    started = time.monotonic()
    assert await conn.execute(STATEMENT, ("h", 1)) == ["row"]
    assert time.monotonic() - started >= 0.25  # not before the interval
    assert conn.session is new


async def test_no_node_and_no_new_connection_is_unavailable() -> None:
    conn = connection(FakeSession())
    conn.RECONNECT_EVERY_S = 0.1

    def refused():  # type: ignore[no-untyped-def]
        raise Unavailable("cassandra cassandra:9042: no node answers")

    conn._connect = refused
    with pytest.raises(Unavailable, match="connecting again failed"):
        await conn.execute(STATEMENT, ("h", 1))
