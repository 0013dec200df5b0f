"""The PostgreSQL backend of the monitoring database (``CALIBSERVE_DATABASE_URL=postgresql://...``), shared by
replicas on several hosts. The SQL is :class:`~service.monitoring_store.MonitoringStore`'s; what differs here:

* one psycopg 3 connection per thread, in autocommit mode, each call one explicit transaction (``BEGIN`` ...
  ``COMMIT``; ``ROLLBACK`` on an error); a connection the server dropped (a restart, a failover, an idle
  timeout) is replaced at the next ``BEGIN``, before anything of the call ran, so a restart costs no request.
* outcome ids go in with one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT (id) DO NOTHING RETURNING id``
  (one round trip, whatever the number of outcomes): the ids it returns are the fresh ones. Two transactions
  inserting the same id at once: the second waits for the first and inserts nothing (the primary key), so the
  id is counted once, by whichever committed; the bin upserts (``ON CONFLICT DO UPDATE``) add atomically. Rows
  are written in key order (outcome ids sorted; bins and histogram rows sorted by the base class), so that
  concurrent transactions lock them in one order and cannot deadlock each other.
* outcome transactions are durable: PostgreSQL's commits are with ``synchronous_commit`` on (the default);
  where the server or role has it off, outcome transactions turn it on for themselves (``SET LOCAL``).
* the schema is created under a transaction-level advisory lock: replicas starting at once do not race on
  ``CREATE TABLE IF NOT EXISTS`` (which is not safe against itself in PostgreSQL).
* connection failures, and the errors that say the database cannot be read or written as configured, raise
  :class:`~service.errors.StoreUnavailable` naming the database without its password.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from service.errors import InvalidInput, StoreUnavailable
from service.monitoring_store import SCHEMA, MonitoringStore, Outcome

CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "calibserve"
# pg_advisory_xact_lock key held while the schema is created ("calib" in ASCII)
SCHEMA_LOCK = 0x63616C6962
OUTCOME_INSERT = """INSERT INTO outcomes (id, model, label, at)
    SELECT given.id, %s, given.label, %s FROM unnest(%s::text[], %s::integer[]) AS given (id, label)
    ORDER BY given.id
    ON CONFLICT (id) DO NOTHING RETURNING id"""
# What says the database cannot be reached, read or written as configured (as opposed to a bug in the SQL):
# connection failures and server shutdowns, disk full, deadlock and statement timeouts (OperationalError), a
# closed connection (InterfaceError), a role without the privileges, a read-only server (a hot standby).
UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    pg_errors.InsufficientPrivilege,
    pg_errors.ReadOnlySqlTransaction,
)


def describe(url: str) -> str:
    """``url`` without its password (in the user part, or a ``password`` parameter) nor its other parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a PostgreSQL URL that cannot be parsed)"
    user, _, host = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    netloc = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _secrets(url: str) -> list[str]:
    """The password of ``url`` as written and decoded, wherever it is given: what no message may show."""
    found = []
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        found += [value for key, value in parse_qsl(parts.query) if key == "password"]
        found += [part.partition("=")[2] for part in parts.query.split("&") if part.startswith("password=")]
    return sorted(
        {secret for raw in found for secret in (raw, unquote(raw)) if secret}, key=len, reverse=True
    )


class _PostgresTransaction:
    """``BEGIN`` (``READ ONLY`` for reads) on the thread's connection, or on a fresh one where the server dropped
    it; ``COMMIT`` on success, ``ROLLBACK`` on an error; errors of :data:`UNAVAILABLE` become StoreUnavailable."""

    def __init__(
        self, store: PostgresMonitoringStore, connection: psycopg.Connection, *, write: bool, durable: bool
    ) -> None:
        self.store, self.connection, self.write, self.durable = store, connection, write, durable

    def __enter__(self) -> psycopg.Cursor:
        try:
            self.cursor = self._begin()
        except UNAVAILABLE as error:
            if not self.connection.closed:
                raise self.store.unavailable(error) from None
            # dropped by the server while idle: nothing of this call ran yet, so one fresh connection, once
            self.connection = self.store._replace(self.connection)
            try:
                self.cursor = self._begin()
            except UNAVAILABLE as error:
                raise self.store.unavailable(error) from None
        return self.cursor

    def _begin(self) -> psycopg.Cursor:
        if self.connection.info.transaction_status not in (TransactionStatus.IDLE, TransactionStatus.UNKNOWN):
            self.connection.rollback()  # left open by a failed rollback: never run inside it
        cursor = self.connection.cursor()
        cursor.execute("BEGIN" if self.write else "BEGIN READ ONLY")
        if self.durable and self.store.relaxed_commit:
            cursor.execute("SET LOCAL synchronous_commit = on")
        return cursor

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            if kind is None:
                try:
                    self.cursor.execute("COMMIT")
                except UNAVAILABLE as error:
                    # the outcome of the COMMIT is unknown: the caller retries, and repeats count once
                    raise self.store.unavailable(error) from None
                return
            if not self.connection.closed:
                with contextlib.suppress(psycopg.Error):
                    self.cursor.execute("ROLLBACK")
        finally:
            self.cursor.close()
        if isinstance(exc, UNAVAILABLE):
            raise self.store.unavailable(exc) from None


class PostgresMonitoringStore(MonitoringStore):
    """The monitoring database at ``url`` (``postgresql://user:password@host:port/dbname?...``, any libpq URI);
    :meth:`close` closes every thread's connection (at shutdown)."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.where = describe(url)
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as error:
            raise InvalidInput(f"database URL {self.where} is not valid: {self._scrub(error)}") from None
        self._defaults: dict[str, Any] = {
            key: value
            for key, value in (("connect_timeout", CONNECT_TIMEOUT_S), ("application_name", APPLICATION_NAME))
            if key not in given
        }
        # set at the first connection: synchronous_commit is off for this role or database (outcome
        # transactions then turn it on for themselves)
        self.relaxed_commit = False
        self._opened: list[tuple[threading.Thread, psycopg.Connection]] = []
        self._opened_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- connections

    def _scrub(self, error: BaseException) -> str:
        message = " ".join(str(error).split())  # libpq's messages run over several lines
        for secret in _secrets(self.url):
            message = message.replace(secret, "***")
        return message

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the monitoring database {self.where} is unavailable: {self._scrub(error)}")

    def _connect(self) -> psycopg.Connection:
        try:
            connection = psycopg.connect(self.url, autocommit=True, **self._defaults)
        except psycopg.Error as error:
            raise StoreUnavailable(
                f"the monitoring database {self.where} cannot be reached: {self._scrub(error)}"
            ) from None
        try:
            setting = connection.execute("SHOW synchronous_commit").fetchone()[0]
        except psycopg.Error as error:
            connection.close()
            raise self.unavailable(error) from None
        self.relaxed_commit = setting == "off"
        with self._opened_lock:
            # connections of threads that have ended (a thread pool shrinking) are closed here
            for _, old in [entry for entry in self._opened if not entry[0].is_alive()]:
                old.close()
            self._opened = [entry for entry in self._opened if entry[0].is_alive()]
            self._opened.append((threading.current_thread(), connection))
        return connection

    def _replace(self, connection: psycopg.Connection) -> psycopg.Connection:
        """A fresh connection for this thread in place of ``connection`` (dropped by the server)."""
        with self._opened_lock:
            self._opened = [entry for entry in self._opened if entry[1] is not connection]
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        fresh = self._connect()
        if getattr(self._local, "connection", None) is None:
            self._local.connection = fresh
        return fresh

    def _transaction(
        self, connection: psycopg.Connection, *, write: bool = True, durable: bool = False
    ) -> _PostgresTransaction:
        return _PostgresTransaction(self, connection, write=write, durable=durable)

    def _create_schema(self, connection: psycopg.Connection) -> None:
        with self._transaction(connection) as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA:
                cursor.execute(statement)

    def close(self) -> None:
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for _, connection in opened:
            connection.close()
        self._local.connection = None

    # ---------------------------------------------------------------------------------------------- writes

    def _insert_outcomes(self, cursor: psycopg.Cursor, model: str, outcomes: Sequence[Outcome]) -> set[str]:
        first: dict[str, int] = {}
        for item in outcomes:
            first.setdefault(item.id, item.label)
        if not first:
            return set()
        ids = sorted(first)
        cursor.execute(OUTCOME_INSERT, (model, time.time(), ids, [first[item] for item in ids]))
        return {row[0] for row in cursor.fetchall()}
