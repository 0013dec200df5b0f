"""A real PostgreSQL server for end-to-end tests of the monitoring database's PostgreSQL backend, started from the
distribution's binaries (Debian's ``postgresql`` package: ``/usr/lib/postgresql/<version>/bin``).

``start_postgres()`` runs ``initdb`` into a fresh temporary directory and starts ``postgres`` on it: listening on
127.0.0.1 only, on a free port, its Unix socket in that directory, ``fsync=on`` (tests check durability),
``trust`` authentication for 127.0.0.1 and nothing else. PostgreSQL refuses to run as root: as root, the server
runs as an unprivileged user (:func:`server_user`: ``calibserve-pg``, ``postgres`` or ``nobody``, whichever
exists first, else a ``calibserve-pg`` system user made with ``useradd``); otherwise as the current user.

Tests connect with psycopg 3 (the ``postgres`` extra) to ``server.dsn``
(``postgresql://calibserve@127.0.0.1:PORT/calibserve``, a superuser). ``stop()`` is PostgreSQL's fast shutdown
(SIGINT to the postmaster: what ``pg_ctl stop -m fast`` sends), SIGKILL after a short grace; ``kill()`` is a crash
(SIGKILL to every process of the cluster: recovery replays the WAL at the next start); ``start()`` brings the
same data directory back on the same port; ``close()`` stops it and removes the directory. A stopped server leaves
no process (found by their working directory, the data directory), no shared memory, and after ``close()`` no
files. :func:`postgres_unavailable_reason` says why PostgreSQL cannot run here.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.servers import free_port, port_is_free

if TYPE_CHECKING:
    import psycopg

BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
PROGRAMS = ("initdb", "postgres")
# The superuser initdb makes, and the database start_postgres() creates: server.dsn's user and dbname.
ROLE = "calibserve"
DATABASE = "calibserve"
# The OS users the server may run as when the tests run as root, in order; the first is created if none exists.
SERVER_USERS = ("calibserve-pg", "postgres", "nobody")
START_TIMEOUT = 30.0
# Seconds stop() waits after SIGINT (fast shutdown: backends end, a shutdown checkpoint) before SIGKILL.
STOP_GRACE = 10.0
# Appended to postgresql.conf; {directory} and {name} are filled in. dynamic_shared_memory_type=mmap keeps the
# segments in the data directory (posix ones in /dev/shm would outlive a kill()); huge_pages off: no reservation.
SETTINGS = """
# calibserve tests (tests/helpers/postgres.py)
listen_addresses = '127.0.0.1'
unix_socket_directories = '{directory}'
cluster_name = '{name}'
fsync = on
synchronous_commit = on
full_page_writes = on
dynamic_shared_memory_type = mmap
huge_pages = off
"""
HBA = """# calibserve tests (tests/helpers/postgres.py): trust over TCP from 127.0.0.1, the only address listened on;
# no entry for the Unix socket, nor any other address.
host    all    all    127.0.0.1/32    trust
"""

_START_FAILURES: list[str] = []
_UNCLOSED: set[PostgresServer] = set()  # closed at exit if a test run forgot one


class PostgresStartError(RuntimeError):
    """initdb failed, or postgres exited or did not accept connections within the timeout; the message ends with
    its log."""


@dataclass(frozen=True)
class ServerUser:
    """The OS user the server runs as: ``switch`` when the tests run as root (Popen's ``user``, ``group``,
    ``extra_groups=[]``), otherwise the current user as it is."""

    name: str
    uid: int
    gid: int
    switch: bool


# ---------------------------------------------------------------------------------------------- availability


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (-1,)


def _has_programs(bindir: Path) -> bool:
    return all(os.access(bindir / program, os.X_OK) for program in PROGRAMS)


@functools.cache
def postgres_bindir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: the newest ``/usr/lib/postgresql/<version>/bin`` that has
    both, else where ``initdb`` or ``pg_ctl`` on PATH really are (Debian puts wrappers or symlinks there)."""
    candidates = sorted((Path(p) for p in glob.glob(BINDIR_GLOB)), key=_version_key, reverse=True)
    for program in ("initdb", "pg_ctl", "postgres"):
        found = shutil.which(program)
        if found:
            candidates.append(Path(os.path.realpath(found)).parent)
    return next((bindir for bindir in candidates if _has_programs(bindir)), None)


def _clean_environment(home: str) -> dict[str, str]:
    """What initdb and postgres run with: no PG* variables of the caller, C locale whatever the host has."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C", "LC_ALL": "C"}


def _switch_arguments(user: ServerUser) -> dict:
    return {"user": user.uid, "group": user.gid, "extra_groups": []} if user.switch else {}


def _usable(user: ServerUser, bindir: Path) -> str | None:
    """Why ``user`` cannot run ``postgres`` nor reach the temporary directory (where the clusters go), or None.
    (Popen changes to ``cwd`` before it switches user: the ``cd`` is the shell's, as ``user``.)"""
    temporary = tempfile.gettempdir()
    try:
        probe = subprocess.run(
            ["/bin/sh", "-c", 'cd "$1" && exec "$2" -V', "sh", temporary, str(bindir / "postgres")],
            capture_output=True,
            text=True,
            timeout=30,
            env=_clean_environment(temporary),
            **_switch_arguments(user),
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"{user.name} cannot run {bindir / 'postgres'}: {error}"
    if probe.returncode != 0:
        return f"{user.name} cannot run {bindir / 'postgres'} in {temporary}: {probe.stderr.strip()[-500:]}"
    return None


def _create_user(name: str) -> str | None:
    """``useradd --system`` (no home, no login); None once the user exists (made here or meanwhile elsewhere)."""
    useradd = shutil.which("useradd")
    if useradd is None:
        return "no useradd"
    made = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "calibserve tests' PostgreSQL",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return None
    return f"useradd {name} failed: {made.stderr.strip()}"


def _existing_user(name: str) -> ServerUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return ServerUser(name, entry.pw_uid, entry.pw_gid, switch=True) if entry.pw_uid != 0 else None


@functools.cache
def server_user() -> ServerUser | str:
    """The user the server runs as, or why there is none. Not root: the current user. Root: the first of
    :data:`SERVER_USERS` that exists, is not uid 0 and can run ``postgres`` here; if none does and
    ``calibserve-pg`` does not exist, it is created (``useradd --system``, no home, no login) and used."""
    bindir = postgres_bindir()
    assert bindir is not None, "postgres_bindir() first"
    if os.geteuid() != 0:
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a passwd entry (some containers)
            name = str(os.geteuid())
        return ServerUser(name, os.geteuid(), os.getegid(), switch=False)
    problems = []
    for user in filter(None, map(_existing_user, SERVER_USERS)):
        if (problem := _usable(user, bindir)) is None:
            return user
        problems.append(problem)
    if _existing_user(SERVER_USERS[0]) is None:
        if (problem := _create_user(SERVER_USERS[0])) is None:
            user = _existing_user(SERVER_USERS[0])
            if user is not None and (problem := _usable(user, bindir)) is None:
                return user
        problems.append(problem or f"{SERVER_USERS[0]} is uid 0")
    tried = "; ".join(problems)
    return f"PostgreSQL refuses to run as root, and no unprivileged user can run it here: {tried}"


@functools.cache
def _driver_problem() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError as error:
        return f"psycopg 3 is not usable ({error}): pip install -e '.[postgres]' (make install)"
    return None


def postgres_unavailable_reason() -> str | None:
    """Why a real PostgreSQL cannot serve the tests here, or None: no ``initdb`` and ``postgres`` (``apt-get
    install postgresql``), no unprivileged user to run it as (running as root), psycopg not importable, or a
    :func:`start_postgres` that already failed in this session."""
    if postgres_bindir() is None:
        return (
            f"no PostgreSQL server programs ({', '.join(PROGRAMS)}) in {BINDIR_GLOB} or on PATH: "
            "apt-get install postgresql"
        )
    user = server_user()
    if isinstance(user, str):
        return user
    return _driver_problem() or (_START_FAILURES[0] if _START_FAILURES else None)


# ------------------------------------------------------------------------------------------------- /proc


def _cluster_processes(data_dir: Path) -> list[int]:
    """Live processes whose working directory is ``data_dir``: the postmaster and every backend and auxiliary
    process of the cluster (all chdir there), including those orphaned by a killed postmaster. Zombies have no
    working directory any more."""
    target = str(data_dir)
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(entry / "cwd") == target:
                found.append(int(entry.name))
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
    except OSError:
        return ""


def _shared_memory_segment(shmid: int) -> tuple[int, int] | None:
    """``(attached processes, owner uid)`` of the SysV segment ``shmid``, or None if there is none."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            fields = line.split()  # key shmid perms size cpid lpid nattch uid ...
            if len(fields) > 7 and fields[1] == str(shmid):
                return int(fields[6]), int(fields[7])
    return None


# ------------------------------------------------------------------------------------------------- server


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory: ``dsn`` (``postgresql://calibserve@127.0.0.1:PORT/calibserve``),
    ``port``, ``directory`` (also the Unix socket's), ``data_dir``, ``log_path``, ``user`` (the OS user it runs as),
    ``pid`` (the postmaster's, while running). Made by :func:`start_postgres`."""

    def __init__(self, *, bindir: Path, user: ServerUser):
        self.bindir = bindir
        self.user = user
        self.directory = Path(tempfile.mkdtemp(prefix="calibserve-pg-")).resolve()
        self.name = (
            self.directory.name
        )  # cluster_name: in every process title ("postgres: <name>: checkpointer")
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None
        self._starts = 0
        self._log_offset = 0
        self._shmid: int | None = None
        self._database_created = False
        _UNCLOSED.add(self)
        if user.switch:
            os.chown(self.directory, user.uid, user.gid)
        self.log_path.touch()

    # -------------------------------------------------------------------------------------------- addresses

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(DATABASE)

    def connect(self, dbname: str = DATABASE, **kwargs) -> psycopg.Connection:
        """A psycopg connection to ``dbname`` (default :data:`DATABASE`), as :data:`ROLE`; ``kwargs`` go to
        ``psycopg.connect`` (``autocommit=True``...)."""
        import psycopg

        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn_for(dbname), **kwargs)

    def create_database(self, name: str | None = None) -> str:
        """``CREATE DATABASE`` (an empty one, from template1; default name ``test_<random>``): its dsn, for a test
        that wants tables of its own on the session's server."""
        from psycopg import sql

        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with self.connect(autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------------------------------- lifecycle

    def _run_as_server(self, command: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            env=_clean_environment(str(self.directory)),
            **_switch_arguments(self.user),
            **kwargs,
        )

    def initdb(self) -> None:
        """Make the cluster: superuser :data:`ROLE`, UTF8, C locale (the host's may not exist), then this harness's
        settings and pg_hba.conf. ``--no-sync``: initdb's own final fsync is skipped (a throw-away directory);
        the server runs with fsync=on."""
        command = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", ROLE, "-E", "UTF8"]
        command += ["--locale=C", "--auth=trust", "--no-sync", "--no-instructions"]
        process = self._run_as_server(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = process.communicate(timeout=120)[0].decode(errors="replace")
        with open(self.log_path, "a") as log:
            log.write(f"--- {' '.join(command)}\n{output}")
        if process.returncode != 0:
            raise PostgresStartError(f"initdb exited with {process.returncode}\n{output.strip()[-3000:]}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(SETTINGS.format(directory=self.directory, name=self.name))
        (self.data_dir / "pg_hba.conf").write_text(HBA)

    def start(self, timeout: float = START_TIMEOUT) -> PostgresServer:
        """Start ``postgres`` on the data directory and wait until it accepts connections. The first start takes a
        free port (another, up to three times, if someone binds it meanwhile) and creates :data:`DATABASE`;
        later starts reuse the port: the same server coming back. Raises :class:`PostgresStartError` with the
        log's tail."""
        if self.running:
            raise RuntimeError("already running")
        if not self.data_dir.is_dir():
            raise RuntimeError(f"no data directory {self.data_dir}: closed, or initdb() not run")
        fresh_port = self.port is None
        for attempt in range(3 if fresh_port else 1):
            if fresh_port:
                self.port = free_port()
            began = time.monotonic()
            self._spawn()
            try:
                self._wait_ready(timeout)
                if not self._database_created:
                    with self.connect("postgres", autocommit=True) as connection:
                        connection.execute(f'CREATE DATABASE "{DATABASE}"')
                    self._database_created = True
            except BaseException as error:
                self.stop(grace=0)
                if not isinstance(error, PostgresStartError):
                    raise
                if not fresh_port or attempt == 2 or port_is_free(self.port):
                    raise
                continue
            self.last_start_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._starts += 1
        self._shmid = None
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self._starts}: {' '.join(command)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            # its own session: a Ctrl-C of the test run does not reach it (atexit stops it); the backends the
            # postmaster forks make sessions of their own anyway, so stop() finds them by working directory
            self.process = self._run_as_server(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_ready(self, timeout: float) -> None:
        """Until the postmaster says "ready" in postmaster.pid (as pg_ctl waits; no connection attempts while it
        starts, nor to whoever holds the port if it could not bind) and a connection over TCP succeeds."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise PostgresStartError(f"postgres exited with {self.process.returncode}\n{self.log_tail()}")
            if self._postmaster_status() == "ready":
                with (
                    contextlib.suppress(psycopg.OperationalError),
                    self.connect("postgres", connect_timeout=2),
                ):
                    self._shmid = self._read_shmid()
                    return
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"not accepting connections within {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _postmaster_status(self) -> str | None:
        """Line 8 of postmaster.pid ("starting", "ready", "stopping") if the file is our postmaster's (a killed
        one leaves its own behind)."""
        with contextlib.suppress(OSError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[0].strip() == str(self.process.pid):
                return lines[7].strip()
        return None

    def _read_shmid(self) -> int | None:
        """The SysV shared memory segment of the running postmaster (postmaster.pid, line 7: key and id)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1])
        return None

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Fast shutdown: SIGINT to the postmaster (``pg_ctl stop -m fast``: sessions end, uncommitted work is
        rolled back, a shutdown checkpoint); after ``grace`` seconds (``grace=0``: at once, a crash) SIGKILL to
        every process of the cluster, then its shared memory segment is removed. Idempotent."""
        if self.process is None:
            return
        began = time.monotonic()
        if self._shmid is None:
            self._shmid = self._read_shmid()
        if grace > 0 and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        deadline = time.monotonic() + 30
        while pids := self.processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {pids} survive SIGKILL")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.05)  # the postmaster is ours to reap; orphaned backends are init's
        self.process.wait()
        self._remove_shared_memory()
        self.process = None
        self.last_stop_seconds = time.monotonic() - began

    def _remove_shared_memory(self) -> None:
        """A killed postmaster leaves its SysV segment (a clean shutdown removes it; so would the next start).
        Removed here, once nothing is attached, so that a killed and closed server leaves nothing."""
        if self._orphaned_segment():
            libc = ctypes.CDLL(None, use_errno=True)
            libc.shmctl(self._shmid, 0, None)  # IPC_RMID

    def _orphaned_segment(self) -> bool:
        """The postmaster's last segment still exists, owned by the server's user, with nothing attached."""
        segment = None if self._shmid is None else _shared_memory_segment(self._shmid)
        return segment is not None and segment == (0, self.user.uid)

    def kill(self) -> None:
        """SIGKILL to every process of the cluster at once: a crash (the committed data must survive it; the next
        ``start()`` recovers from the WAL)."""
        self.stop(grace=0)

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop, and remove the temporary directory (data, socket, log). Idempotent."""
        self.stop(grace)
        shutil.rmtree(self.directory, ignore_errors=True)
        _UNCLOSED.discard(self)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- leftovers

    def processes(self) -> list[int]:
        """The live processes of this cluster (working directory: the data directory)."""
        return _cluster_processes(self.data_dir)

    def leftovers(self) -> list[str]:
        """What a stopped server still has (nothing, after ``stop()``; after ``close()`` not its directory either):
        live processes of the cluster, a shared memory segment."""
        found = [f"process {pid}: {_cmdline(pid)}" for pid in self.processes()]
        if not self.running and self._orphaned_segment():
            found.append(f"shared memory segment {self._shmid}")
        return found

    # ------------------------------------------------------------------------------------------------- logs

    def _current_log(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._current_log().splitlines()[-lines:])


def start_postgres(timeout: float = START_TIMEOUT) -> PostgresServer:
    """A started :class:`PostgresServer` in a fresh temporary directory (initdb, then start). Call
    :func:`postgres_unavailable_reason` first. Raises :class:`PostgresStartError` (with the log's tail) if initdb
    fails or the server does not accept connections within ``timeout`` seconds; the failure is then also what
    :func:`postgres_unavailable_reason` answers for the rest of the session."""
    bindir = postgres_bindir()
    user = server_user() if bindir is not None else None
    if bindir is None or not isinstance(user, ServerUser):
        raise PostgresStartError(postgres_unavailable_reason() or "PostgreSQL unavailable")
    server = PostgresServer(bindir=bindir, user=user)
    try:
        server.initdb()
        return server.start(timeout)
    except PostgresStartError as error:
        server.close(grace=0)
        _START_FAILURES.append(f"PostgreSQL did not start: {error}")
        raise
    except BaseException:
        server.close(grace=0)
        raise


@atexit.register
def _close_forgotten_servers() -> None:
    for server in list(_UNCLOSED):
        server.close(grace=2.0)
