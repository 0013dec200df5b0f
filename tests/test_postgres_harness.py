"""The PostgreSQL harness (tests/helpers/postgres.py) against the real server: what is committed survives a fast
shutdown and a crash, the server listens where and runs as whom it should, and a closed server leaves nothing.

The durability checks share the session's ``postgres`` server (each in a database of its own; a test that stops
it starts it again); the closing check starts a small one of its own (under a second) so that closing it does
not disturb the session's.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import postgres as harness
from tests.helpers.postgres import (
    DATABASE,
    ROLE,
    PostgresServer,
    PostgresStartError,
    postgres_unavailable_reason,
    start_postgres,
)
from tests.helpers.requirements import require_or_skip

# Without the `postgres` extra, postgres_unavailable_reason() says so and the tests skip (or fail, in CI).
try:
    import psycopg
except ImportError:
    psycopg = None


def rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn, connect_timeout=10) as connection:
        return connection.execute("SELECT id, note FROM events ORDER BY id").fetchall()


def pgrep(pattern: str) -> list[str]:
    """``pgrep -af pattern``: the processes whose command line (or, for PostgreSQL's, process title) has it."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr
    return found.stdout.splitlines()


def uid_of(pid: int) -> int | None:
    """The real uid of ``pid``; None when it has exited since it was listed (a backend's life can be short)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


def test_postgresql_is_available_here(postgres: PostgresServer):
    assert postgres_unavailable_reason() is None
    assert postgres.dsn == f"postgresql://{ROLE}@127.0.0.1:{postgres.port}/{DATABASE}"


def test_committed_rows_survive_a_fast_shutdown_and_a_crash_uncommitted_ones_do_not(postgres: PostgresServer):
    dsn = postgres.create_database()
    port = postgres.port
    with psycopg.connect(dsn) as connection:
        connection.execute("CREATE TABLE events (id integer PRIMARY KEY, note text NOT NULL)")
        connection.execute("INSERT INTO events VALUES (1, 'committed')")
        connection.commit()
    pending = psycopg.connect(dsn)
    pending.execute("INSERT INTO events VALUES (2, 'never committed')")
    try:
        postgres.stop()  # fast shutdown: the open transaction is rolled back, its session ended
        assert not postgres.running and postgres.leftovers() == []
        assert postgres.last_stop_seconds < harness.STOP_GRACE  # shut down by itself, not killed
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2)
    finally:
        pending.close()
        postgres.start()
    assert postgres.port == port and postgres.running
    assert rows(dsn) == [(1, "committed")]

    with psycopg.connect(dsn) as connection:
        connection.execute("INSERT INTO events VALUES (3, 'committed before the crash')")
    try:
        postgres.kill()  # SIGKILL to every process of the cluster: no checkpoint, recovery from the WAL
        assert postgres.leftovers() == []
    finally:
        postgres.start()
    assert rows(dsn) == [(1, "committed"), (3, "committed before the crash")]
    assert "not properly shut down; automatic recovery in progress" in postgres.log_tail(200)


def test_the_server_is_durable_local_and_unprivileged(postgres: PostgresServer):
    with postgres.connect() as connection:
        settings = {
            name: connection.execute(f"SHOW {name}").fetchone()[0]
            for name in ("fsync", "synchronous_commit", "full_page_writes", "listen_addresses")
        }
        is_superuser = connection.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "listen_addresses": "127.0.0.1",
    }
    assert is_superuser == (True,)
    processes = postgres.processes()
    assert postgres.pid in processes and len(processes) > 1  # the postmaster and its auxiliary processes
    assert {uid_of(pid) for pid in processes} - {None} == {postgres.user.uid} != {0}
    if os.geteuid() != 0:
        assert postgres.user.uid == os.geteuid()
    assert (postgres.directory / f".s.PGSQL.{postgres.port}").is_socket()
    assert (postgres.directory.stat().st_mode & 0o077) == 0


def test_a_restart_on_a_port_taken_meanwhile_fails_with_the_log_then_succeeds_once_it_is_free(
    postgres: PostgresServer,
):
    postgres.stop()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port has connections in TIME_WAIT
    try:
        squatter.bind(("127.0.0.1", postgres.port))
        squatter.listen()
        with pytest.raises(PostgresStartError, match=r"(?s)exited.*could not bind"):
            postgres.start()
        assert postgres.leftovers() == []
    finally:
        squatter.close()
        postgres.start()
    with postgres.connect() as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def test_close_leaves_no_process_no_shared_memory_and_no_files():
    if (reason := postgres_unavailable_reason()) is not None:
        require_or_skip(reason)
    with start_postgres() as server:
        data_dir, directory = str(server.data_dir), server.directory
        assert len(pgrep(data_dir)) == 1  # the postmaster: "postgres -D <data_dir> -p <port>"
        assert len(pgrep(server.name)) >= 4  # its processes' titles carry cluster_name
        shmid = server._read_shmid()
        assert harness._shared_memory_segment(shmid) is not None
    assert pgrep(data_dir) == [] and pgrep(server.name) == []
    assert server.processes() == [] and server.leftovers() == []
    assert harness._shared_memory_segment(shmid) is None
    assert not directory.exists()
    server.close()  # idempotent
    with pytest.raises(RuntimeError, match="no data directory"):
        server.start()


def test_unavailable_reasons_name_what_is_missing(monkeypatch, tmp_path):
    caches = (harness.postgres_bindir, harness.server_user, harness._driver_problem)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(harness, "BINDIR_GLOB", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        assert "apt-get install postgresql" in postgres_unavailable_reason()
    finally:
        monkeypatch.undo()
        harness.postgres_bindir.cache_clear()
    if harness.postgres_bindir() is None or isinstance(harness.server_user(), str):
        require_or_skip(postgres_unavailable_reason())
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    try:
        assert "pip install -e '.[postgres]'" in postgres_unavailable_reason()
    finally:
        monkeypatch.undo()
        harness._driver_problem.cache_clear()


def test_as_root_the_server_runs_as_the_first_usable_unprivileged_user_or_a_created_one(monkeypatch):
    """The choice of user alone (hermetic: nothing is run, nobody created): existing ones in order, never uid
    0, then calibserve-pg made with useradd; none of them: a reason that says what was tried."""
    choose = harness.server_user.__wrapped__  # not the session's cached answer
    tried = []

    def usable(user, bindir):
        tried.append(user.name)
        return None if user.name == "nobody" else f"{user.name} cannot run postgres"

    passwd = {"root": 0, "daemon": 1, "nobody": 65534}

    def getpwnam(name):
        if name not in passwd:
            raise KeyError(name)
        return pwd.struct_passwd((name, "x", passwd[name], passwd[name], "", "/", "/bin/sh"))

    monkeypatch.setattr(harness.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 0)
    monkeypatch.setattr(harness, "postgres_bindir", lambda: Path("/usr/lib/postgresql/15/bin"))
    monkeypatch.setattr(harness, "_usable", usable)
    monkeypatch.setattr(harness, "_create_user", lambda name: pytest.fail(f"created {name}"))
    monkeypatch.setattr(harness, "SERVER_USERS", ("calibserve-test-no-such-user", "root", "daemon", "nobody"))
    user = choose()
    assert user == harness.ServerUser("nobody", 65534, 65534, switch=True)
    assert tried == ["daemon", "nobody"]  # root (uid 0) and a user that does not exist are not candidates

    monkeypatch.setattr(harness, "SERVER_USERS", ("calibserve-test-no-such-user", "daemon"))
    monkeypatch.setattr(harness, "_create_user", lambda name: f"useradd {name} failed: permission denied")
    reason = choose()
    assert reason.startswith("PostgreSQL refuses to run as root")
    assert "daemon cannot run postgres" in reason and "useradd calibserve-test-no-such-user failed" in reason
