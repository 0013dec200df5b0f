"""CalibratorStore: immutable, versioned calibrator records on disk.

Layout under ``root``::

    <root>/<model>/model.json                     model metadata (JSON object)
    <root>/<model>/model.pt                       uploaded TorchScript bytes (optional)
    <root>/<model>/active                         pointer: the active version number as text
    <root>/<model>/calibrators/<version>.json     one calibrator document, immutable once written
    <root>/<model>/calibrators/.reserved/<n>      empty marker: version number n has been handed out
    <root>/<model>/.lock                          flock(2) target serialising pointer changes

Guarantees, with several worker processes (or replicas on one shared volume) writing the same store:

- **Atomic, durable writes.** Every file is written to ``.<final-name>.<uuid>.tmp`` in its final directory,
  fsynced, then moved into place (``os.replace``; ``os.link`` for version files) and the directory fsynced.
  A reader sees the old file or the new one, never a torn one. On any ``OSError`` the temp file is removed
  and :class:`~service.errors.StoreUnavailable` is raised; nothing partial stays behind.
- **Version numbers are never reused.** A number is claimed by creating ``calibrators/.reserved/<n>`` with
  ``O_CREAT | O_EXCL``, which exactly one process can win, and the marker is kept forever (deleting a version
  removes ``<n>.json`` only). Tombstones of deleted versions alone would not do: a writer that read the
  directory before version n was created *and* deleted could still claim n. A ``.next`` counter would need
  a read-modify-write under a lock. With markers, allocation is lock-free: try ``1 + max(claimed)``, then
  the next number on ``FileExistsError``. A write that fails after its claim burns the number (like a
  database sequence), so versions stay increasing in creation order.
- **Version files appear complete or not at all.** The document is written and fsynced under a temp name,
  then hard-linked to ``<n>.json`` (``link(2)`` fails rather than overwrite), so the final name never
  refers to a partial file.
- **The active pointer** is replaced atomically. Pointer changes (activate, delete a version, activate a new
  fit) take a per-model ``flock`` so that "delete version v unless it is active" cannot interleave with
  "activate v"; reads never lock. When two fits activate at once, the last activation wins.
- **Cheap change detection.** :meth:`CalibratorStore.active_stamp` is one ``stat`` of the pointer. Each
  activation gives the pointer a new inode (``os.replace``) and a strictly larger ``st_mtime_ns`` (set
  explicitly, because the kernel's file timestamps tick coarsely and a freed inode number is often
  reused at once): a worker caching the active calibrator reloads exactly when the stamp changes.
- **Deleting a model** renames its directory to ``.<name>.deleted-<uuid>`` (atomic) before removing it,
  so a concurrent reader sees the whole model or none of it.
- Directory operations on a model go through a directory file descriptor (``openat``-style), so a writer
  that raced a ``delete_model`` fails with NotFound instead of writing into a new model of the same name.

POSIX only (``fcntl.flock``, ``dir_fd``): the service runs on Linux.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import operator
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from service.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from service.names import is_model_name, validate_model_name

__all__ = ["CalibratorStore"]

logger = logging.getLogger(__name__)

_VERSION_FILE_RE = re.compile(r"([1-9][0-9]*)\.json")
_RESERVED_RE = re.compile(r"[1-9][0-9]*")
_TEMP_RE = re.compile(r"\..*\.[0-9a-f]{32}\.tmp")
_TOMBSTONE_RE = re.compile(r"\..+\.deleted-[0-9a-f]{32}")

_MODEL_FILE = "model.json"
_TORCHSCRIPT_FILE = "model.pt"
_POINTER_FILE = "active"
_LOCK_FILE = ".lock"
_CALIBRATORS_DIR = "calibrators"
_RESERVED_DIR = ".reserved"

_MAX_PAGE = 1000
_TEMP_MIN_AGE_S = 60.0
# Errors with which link(2) says "this file system has no hard links" rather than "this write failed".
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _stat_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (info.st_mtime_ns, info.st_ino, info.st_size)


def _check_version(version: object) -> int:
    if isinstance(version, bool):
        raise InvalidInput(f"version must be a positive integer, got {version!r}", field="version")
    try:
        number = operator.index(version)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidInput(f"version must be a positive integer, got {version!r}", field="version") from None
    if number < 1:
        raise InvalidInput(f"version must be a positive integer, got {number}", field="version")
    return number


def model_page(
    store: Any, names: list[str], *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of ``list_models`` over any store's sorted model ``names``: the metadata of up to ``limit``
    models after ``cursor``, and the next cursor (None: no real model follows). A model being created or
    deleted meanwhile is skipped."""
    names = [n for n in names if cursor is None or n > cursor]
    items: list[dict[str, Any]] = []
    for position, model_name in enumerate(names):
        if len(items) == limit:
            # A page is "not the last" only if a real model follows it.
            more = any(store.model_exists(n) for n in names[position:])
            return items, (items[-1]["name"] if more else None)
        try:
            items.append(store.get_model(model_name))
        except NotFound:
            continue  # being created or deleted right now
    return items, None


def calibrator_page(
    store: Any, name: str, *, limit: object, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of ``list_calibrators`` over any store's ``_versions`` (newest first) and
    ``get_calibrator``: the documents below the cursor's version, and the next cursor (None: the last
    page). A version deleted between listing and reading is skipped."""
    limit = _check_limit(limit)
    below: int | None = None
    if cursor is not None:
        try:
            below = _check_version(int(str(cursor)))
        except (ValueError, InvalidInput):
            raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor") from None
    items: list[dict[str, Any]] = []
    last_version = 0
    for version in store._versions(name):
        if below is not None and version >= below:
            continue
        if len(items) == limit:
            return items, str(last_version)
        try:
            items.append(store.get_calibrator(name, version))
        except NotFound:
            continue  # deleted between listing and reading
        last_version = version
    return items, None


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_PAGE:
        raise InvalidInput(f"limit must be an integer in [1, {_MAX_PAGE}], got {limit!r}", field="limit")
    return limit


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _unwritable(exc: OSError) -> StoreUnavailable:
    logger.error("calibrator store write failed: %s", exc)
    return StoreUnavailable(f"calibrator store is not writable: {_reason(exc)}")


def _unreadable(exc: OSError, shown: str) -> StoreUnavailable:
    logger.error("calibrator store read failed: %s", exc)
    return StoreUnavailable(f"calibrator store is not readable: {_reason(exc)} ({shown})")


def _encode(document: dict[str, Any], *, what: str) -> bytes:
    try:
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}", field="document") from exc


@contextlib.contextmanager
def _opened_dir(name: str | Path, *, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _calibrator_dirs(model_fd: int) -> Iterator[tuple[int, int]]:
    """``(calibrators_fd, reserved_fd)`` of a model, each made where missing: both exist in a model made by
    put_model, but a model.json copied in by hand may come alone."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(_CALIBRATORS_DIR, 0o755, dir_fd=model_fd)
    with _opened_dir(_CALIBRATORS_DIR, dir_fd=model_fd) as calibrators_fd:
        with contextlib.suppress(FileExistsError):
            os.mkdir(_RESERVED_DIR, 0o755, dir_fd=calibrators_fd)
        with _opened_dir(_RESERVED_DIR, dir_fd=calibrators_fd) as reserved_fd:
            yield calibrators_fd, reserved_fd


def _pointer_at(model_fd: int) -> int | None:
    """The version the pointer names, read through a model directory fd; None if absent or unreadable."""
    try:
        fd = os.open(_POINTER_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=model_fd)
        try:
            return int(os.read(fd, 64).decode("ascii").strip())
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _write_file_at(
    dir_fd: int, final_name: str, data: bytes, *, exclusive: bool, mtime_ns: int | None = None
) -> None:
    """Write ``data`` to ``final_name`` in the directory ``dir_fd``, atomically and durably.

    ``exclusive=True`` publishes with link(2), which raises FileExistsError instead of overwriting. OSError
    propagates; the temp file is gone either way.
    """
    tmp_name = f".{final_name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    tmp_left = True
    try:
        try:
            _write_all(fd, data)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
        if not exclusive:
            os.replace(tmp_name, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp_left = False
            os.fsync(dir_fd)  # a replaced file cannot be rolled back: its old content is gone
            return
        tmp_left = _publish_exclusive(dir_fd, tmp_name, final_name)
        try:
            if tmp_left:
                os.unlink(tmp_name, dir_fd=dir_fd)
                tmp_left = False
            os.fsync(dir_fd)
        except OSError:
            # A new version whose directory entry may not be durable is withdrawn, so that an error always
            # means "no new version".
            _unlink_quietly(final_name, dir_fd)
            raise
    finally:
        if tmp_left:
            _unlink_quietly(tmp_name, dir_fd)


def _publish_exclusive(dir_fd: int, tmp_name: str, final_name: str) -> bool:
    """Give the temp file its final name unless that name exists; return whether the temp name remains."""
    try:
        os.link(tmp_name, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links on this volume (some FUSE / SMB mounts). The caller holds the reservation marker for
        # this name, so only a file placed by hand can be there: refuse that, else rename.
        try:
            os.stat(final_name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.replace(tmp_name, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return False
        raise FileExistsError(errno.EEXIST, "version file exists", final_name) from exc


def _remove_tree(path: Path) -> None:
    """rmtree that tolerates a concurrent remover and logs, never raises (the caller's work is done)."""

    def log_error(function: Any, failed_path: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            logger.warning("could not remove %s (cleanup_temp_files will retry): %s", failed_path, exc)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=log_error)
    else:
        shutil.rmtree(path, onerror=lambda function, failed, info: log_error(function, failed, info[1]))


class CalibratorStore:
    """Versioned calibrator documents and model metadata in a directory tree.

    Parameters
    ----------
    root : path-like
        The store directory. It is created by the first write; nothing touches the disk in ``__init__``.

    Notes
    -----
    Every public method validates the model name before any file-system access. Missing models and versions
    raise :class:`~service.errors.NotFound`; a failing write (read-only volume, disk full, I/O error) raises
    :class:`~service.errors.StoreUnavailable` and leaves nothing partial; a stored file that does not parse
    raises StoreUnavailable naming the file. Instances are safe to share
    between threads; any number of processes may use the same root concurrently (see the module docstring).
    (Besides ``root`` it only caches the path strings of :meth:`change_stamp`.)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._stamp_paths: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"CalibratorStore({str(self.root)!r})"

    # -- paths and small helpers --------------------------------------------------------------------------

    def _model_dir(self, name: object) -> Path:
        return self.root / validate_model_name(name)

    def _shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _read_json(self, path: Path) -> dict[str, Any]:
        """Parse one stored JSON object; FileNotFoundError propagates, other failures are StoreUnavailable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _unreadable(exc, self._shown(path)) from exc
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            logger.error("corrupt file in calibrator store: %s: %s", path, exc)
            raise StoreUnavailable(
                f"stored file {self._shown(path)} is corrupt: not valid JSON ({exc})"
            ) from exc
        if not isinstance(document, dict):
            raise StoreUnavailable(f"stored file {self._shown(path)} is corrupt: not a JSON object")
        return document

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"model {name!r} does not exist")

    def _write_failed(self, name: str, exc: OSError) -> NotFound | StoreUnavailable:
        # ENOENT in the middle of a write means the model was deleted under us, not a broken volume.
        if isinstance(exc, FileNotFoundError) and not self.model_exists(name):
            return self._not_found(name)
        return _unwritable(exc)

    @contextlib.contextmanager
    def _open_model(self, name: str) -> Iterator[int]:
        """Yield a directory fd of an existing model; NotFound if it has no model.json."""
        try:
            model_fd = os.open(self.root / name, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        try:
            try:
                os.stat(_MODEL_FILE, dir_fd=model_fd)
            except FileNotFoundError:
                raise self._not_found(name) from None
            yield model_fd
        finally:
            os.close(model_fd)

    @contextlib.contextmanager
    def _pointer_lock(self, model_fd: int) -> Iterator[None]:
        fd = os.open(_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=model_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the only descriptor releases the lock

    def _read_pointer(self, name: str) -> int | None:
        path = self.root / name / _POINTER_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            if not self.model_exists(name):
                raise self._not_found(name) from None
            return None
        except OSError as exc:
            raise _unreadable(exc, self._shown(path)) from exc
        try:
            return _check_version(int(text.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError, InvalidInput) as exc:
            raise StoreUnavailable(
                f"stored file {self._shown(path)} is corrupt: not a version number ({text[:20]!r})"
            ) from exc

    def _write_pointer(self, model_fd: int, version: int) -> None:
        # A strictly increasing mtime keeps active_stamp() unique even when the kernel clock has not ticked
        # and the inode number freed by the previous pointer is handed out again. Callers hold the lock.
        try:
            previous_ns: int | None = os.stat(_POINTER_FILE, dir_fd=model_fd).st_mtime_ns
        except FileNotFoundError:
            previous_ns = None
        now_ns = time.time_ns()
        mtime_ns = now_ns if previous_ns is None else max(now_ns, previous_ns + 1)
        _write_file_at(model_fd, _POINTER_FILE, f"{version}\n".encode(), exclusive=False, mtime_ns=mtime_ns)

    def _activate_locked(self, name: str, model_fd: int, version: int) -> dict[str, Any]:
        # Reading the document both proves it exists and refuses to activate a corrupt one.
        document = self.get_calibrator(name, version)
        self._write_pointer(model_fd, version)
        return document

    # -- models -------------------------------------------------------------------------------------------

    def put_model(self, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Create a model or replace its metadata; return the stored metadata (with ``"name"``).

        A new model appears complete: its directory is assembled under a temp name and renamed into place.
        Calibrators, the active pointer and an uploaded TorchScript file of an existing model are kept.
        """
        model_dir = self._model_dir(name)
        if not isinstance(metadata, dict):
            raise InvalidInput("model metadata must be a JSON object", field="metadata")
        stored = {**metadata, "name": name}
        data = _encode(stored, what="model metadata")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # A few rounds only matter when a concurrent delete_model removes the directory in between.
            for _ in range(3):
                if not model_dir.is_dir() and self._create_model_dir(name, data):
                    break
                try:
                    with _opened_dir(model_dir) as model_fd:
                        _write_file_at(model_fd, _MODEL_FILE, data, exclusive=False)
                    break
                except FileNotFoundError:
                    continue
            else:
                raise FileNotFoundError(errno.ENOENT, "model directory keeps disappearing", str(model_dir))
        except OSError as exc:
            raise _unwritable(exc) from exc
        return orjson.loads(data)  # type: ignore[no-any-return]

    def _create_model_dir(self, name: str, model_json: bytes) -> bool:
        """Build a complete model directory under a temp name and rename it into place.

        Returns False when another writer created the model first (the caller then replaces model.json).
        """
        tmp_dir = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp_dir.mkdir()
            (tmp_dir / _CALIBRATORS_DIR / _RESERVED_DIR).mkdir(parents=True)
            with _opened_dir(tmp_dir) as tmp_fd:
                _write_file_at(tmp_fd, _MODEL_FILE, model_json, exclusive=False)
            for directory in (tmp_dir / _CALIBRATORS_DIR / _RESERVED_DIR, tmp_dir / _CALIBRATORS_DIR):
                with _opened_dir(directory) as fd:
                    os.fsync(fd)
            try:
                os.rename(tmp_dir, self.root / name)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                return False
            with _opened_dir(self.root) as root_fd:
                os.fsync(root_fd)
            return True
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def get_model(self, name: str) -> dict[str, Any]:
        """Return the model's metadata; NotFound if there is no such model."""
        path = self._model_dir(name) / _MODEL_FILE
        try:
            metadata = self._read_json(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        metadata["name"] = name
        return metadata

    def model_exists(self, name: str) -> bool:
        """Whether the model exists (has its metadata file)."""
        return (self._model_dir(name) / _MODEL_FILE).is_file()

    def list_models(
        self, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Return one page of model metadata sorted by name, and the cursor of the next page.

        Parameters
        ----------
        limit : int, default=100
            Page size, 1 to 1000.
        cursor : str or None
            The ``next_cursor`` of the previous page (the last name it returned); None for the first page.

        Returns
        -------
        items : list of dict
            Metadata of up to ``limit`` models whose names sort after ``cursor``.
        next_cursor : str or None
            None when this is the last page.
        """
        limit = _check_limit(limit)
        if cursor is not None:
            try:
                validate_model_name(cursor)
            except InvalidInput:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor") from None
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.root)
                if is_model_name(entry.name) and entry.is_dir(follow_symlinks=False)
            )
        except FileNotFoundError:
            return [], None
        except OSError as exc:
            raise _unreadable(exc, ".") from exc
        return model_page(self, names, limit=limit, cursor=cursor)

    def delete_model(self, name: str) -> None:
        """Delete a model with all its versions, pointer and TorchScript file.

        The directory is first renamed to a hidden tombstone (atomic), then removed, so a concurrent reader
        sees the whole model or none of it. A tombstone left by a crash is removed by cleanup_temp_files().
        """
        model_dir = self._model_dir(name)
        if not self.model_exists(name):
            raise self._not_found(name)
        tombstone = self.root / f".{name}.deleted-{uuid.uuid4().hex}"
        try:
            os.rename(model_dir, tombstone)
        except FileNotFoundError:
            raise self._not_found(name) from None
        except OSError as exc:
            raise _unwritable(exc) from exc
        try:
            with _opened_dir(self.root) as root_fd:
                os.fsync(root_fd)
        except OSError as exc:
            logger.warning("could not fsync %s after deleting model %r: %s", self.root, name, exc)
        _remove_tree(tombstone)

    # -- TorchScript --------------------------------------------------------------------------------------

    def put_torchscript(self, name: str, data: bytes) -> Path:
        """Store the TorchScript file of an existing model (atomically); return its path."""
        model_dir = self._model_dir(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput("TorchScript data must be bytes", field="data")
        try:
            with self._open_model(name) as model_fd:
                _write_file_at(model_fd, _TORCHSCRIPT_FILE, bytes(data), exclusive=False)
        except OSError as exc:
            raise self._write_failed(name, exc) from exc
        return model_dir / _TORCHSCRIPT_FILE

    def torchscript_path(self, name: str) -> Path | None:
        """Path of the model's uploaded TorchScript file, None if none was uploaded; NotFound for no model."""
        path = self._model_dir(name) / _TORCHSCRIPT_FILE
        if path.is_file():
            return path
        if not self.model_exists(name):
            raise self._not_found(name)
        return None

    # -- calibrators --------------------------------------------------------------------------------------

    def add_calibrator(self, name: str, document: dict[str, Any], *, activate: bool = True) -> dict[str, Any]:
        """Store ``document`` as the model's next version; return the stored document.

        The store sets ``"model"`` and ``"version"`` (the caller's dict is not modified). Version numbers are
        allocated without a lock and are unique across processes; they are never reused, not even after the
        highest version is deleted. With ``activate=True`` the new version becomes the active one (the last
        activation wins when several happen at once). On failure nothing is stored and the active version is
        unchanged; the claimed number stays unused.
        """
        self._model_dir(name)
        if not isinstance(document, dict):
            raise InvalidInput("calibrator document must be a JSON object", field="document")
        _encode({**document, "model": name, "version": 0}, what="calibrator document")  # fail before claiming
        try:
            with (
                self._open_model(name) as model_fd,
                _calibrator_dirs(model_fd) as (calibrators_fd, reserved_fd),
            ):
                version, data = self._claim_and_write(name, document, calibrators_fd, reserved_fd)
                if activate:
                    self._activate_new(model_fd, calibrators_fd, version)
        except OSError as exc:
            raise self._write_failed(name, exc) from exc
        logger.info("stored calibrator version %d of model %r (activate=%s)", version, name, activate)
        return orjson.loads(data)  # type: ignore[no-any-return]

    def import_calibrator(self, name: str, document: dict[str, Any]) -> bool:
        """Store a document under its own ``version`` (a copy from another store), inactive.

        Returns True when written, False when that very document was there already (copies are idempotent);
        Conflict when another document holds the number. The number is reserved like any other.
        """
        self._model_dir(name)
        if not isinstance(document, dict):
            raise InvalidInput("calibrator document must be a JSON object", field="document")
        version = _check_version(document.get("version"))
        data = _encode({**document, "model": name}, what="calibrator document")
        try:
            with (
                self._open_model(name) as model_fd,
                _calibrator_dirs(model_fd) as (calibrators_fd, reserved_fd),
            ):
                with contextlib.suppress(FileExistsError):
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                    os.close(os.open(str(version), flags, 0o644, dir_fd=reserved_fd))
                os.fsync(reserved_fd)
                try:
                    _write_file_at(calibrators_fd, f"{version}.json", data, exclusive=True)
                except FileExistsError:
                    if self.get_calibrator(name, version) != orjson.loads(data):
                        raise Conflict(
                            f"model {name!r} holds a different calibrator version {version}"
                        ) from None
                    return False
        except OSError as exc:
            raise self._write_failed(name, exc) from exc
        return True

    def _claim_and_write(
        self, name: str, document: dict[str, Any], calibrators_fd: int, reserved_fd: int
    ) -> tuple[int, bytes]:
        claimed = [int(n) for n in os.listdir(reserved_fd) if _RESERVED_RE.fullmatch(n)]
        present = [int(m[1]) for n in os.listdir(calibrators_fd) if (m := _VERSION_FILE_RE.fullmatch(n))]
        candidate = 1 + max(claimed + present, default=0)
        while True:
            try:
                marker = os.open(
                    str(candidate),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o644,
                    dir_fd=reserved_fd,
                )
            except FileExistsError:
                candidate += 1
                continue
            os.close(marker)
            # The claim must be durable before the version can be seen, or a crash could hand it out again.
            os.fsync(reserved_fd)
            data = _encode({**document, "model": name, "version": candidate}, what="calibrator document")
            try:
                _write_file_at(calibrators_fd, f"{candidate}.json", data, exclusive=True)
            except FileExistsError:
                # A version file without a marker (copied in by hand): skip past it.
                candidate += 1
                continue
            return candidate, data

    def _activate_new(self, model_fd: int, calibrators_fd: int, version: int) -> None:
        """Point at a version just written; if that fails, withdraw the version (an error adds nothing)."""

        def withdraw() -> None:
            _unlink_quietly(f"{version}.json", calibrators_fd)
            with contextlib.suppress(OSError):
                os.fsync(calibrators_fd)

        locked = False
        try:
            with self._pointer_lock(model_fd):
                locked = True
                try:
                    self._write_pointer(model_fd, version)
                except OSError:
                    # A pointer that was replaced before the failure (directory fsync) names this version:
                    # then the version must stay, or the pointer would dangle.
                    if _pointer_at(model_fd) != version:
                        withdraw()
                    raise
        except OSError:
            if not locked:
                withdraw()
            raise

    def get_calibrator(self, name: str, version: int) -> dict[str, Any]:
        """Return one stored calibrator document; NotFound if the model or the version does not exist."""
        model_dir = self._model_dir(name)
        version = _check_version(version)
        try:
            return self._read_json(model_dir / _CALIBRATORS_DIR / f"{version}.json")
        except (FileNotFoundError, NotADirectoryError):
            if not self.model_exists(name):
                raise self._not_found(name) from None
            raise NotFound(f"model {name!r} has no calibrator version {version}") from None

    def _versions(self, name: str) -> list[int]:
        directory = self._model_dir(name) / _CALIBRATORS_DIR
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            if not self.model_exists(name):
                raise self._not_found(name) from None
            return []
        except OSError as exc:
            raise _unreadable(exc, self._shown(directory)) from exc
        if not self.model_exists(name):
            raise self._not_found(name)
        return sorted(
            (int(m[1]) for n in names if (m := _VERSION_FILE_RE.fullmatch(n))),
            reverse=True,
        )

    def list_calibrators(
        self, name: str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Return one page of the model's calibrator documents, newest first, and the next page's cursor.

        Parameters
        ----------
        limit : int, default=50
            Page size, 1 to 1000.
        cursor : str or None
            The ``next_cursor`` of the previous page; None for the first page.

        Returns
        -------
        items : list of dict
            Up to ``limit`` documents with versions below the cursor, highest version first.
        next_cursor : str or None
            None when this is the last page.
        """
        self._model_dir(name)
        return calibrator_page(self, name, limit=limit, cursor=cursor)

    def delete_calibrator(self, name: str, version: int) -> None:
        """Delete one version; Conflict if it is the active one. Its number stays reserved forever."""
        self._model_dir(name)
        version = _check_version(version)
        try:
            with (
                self._open_model(name) as model_fd,
                _opened_dir(_CALIBRATORS_DIR, dir_fd=model_fd) as calibrators_fd,
                self._pointer_lock(model_fd),
            ):
                if self._read_pointer(name) == version:
                    raise Conflict(
                        f"calibrator version {version} is the active one of model {name!r}: "
                        "activate another version first"
                    )
                try:
                    os.unlink(f"{version}.json", dir_fd=calibrators_fd)
                except FileNotFoundError:
                    raise NotFound(f"model {name!r} has no calibrator version {version}") from None
                os.fsync(calibrators_fd)
        except OSError as exc:
            raise self._write_failed(name, exc) from exc
        logger.info("deleted calibrator version %d of model %r", version, name)

    def activate(self, name: str, version: int) -> dict[str, Any]:
        """Make ``version`` the active one (atomic pointer replace); return its document.

        NotFound if the version does not exist; StoreUnavailable (and the pointer unchanged) if its file is
        corrupt or the pointer cannot be written.
        """
        self._model_dir(name)
        version = _check_version(version)
        try:
            with self._open_model(name) as model_fd, self._pointer_lock(model_fd):
                document = self._activate_locked(name, model_fd, version)
        except OSError as exc:
            raise self._write_failed(name, exc) from exc
        logger.info("activated calibrator version %d of model %r", version, name)
        return document

    def active_version(self, name: str) -> int | None:
        """The active version number, None if no version was activated; NotFound for no model."""
        self._model_dir(name)
        return self._read_pointer(name)

    def active_calibrator(self, name: str) -> dict[str, Any] | None:
        """The active calibrator document, None if no version was activated; NotFound for no model.

        To cache it, take :meth:`active_stamp` *before* calling this: a change in between then only causes
        one extra reload, never a stale cache.
        """
        self._model_dir(name)
        version = self._read_pointer(name)
        for _ in range(8):
            if version is None:
                return None
            try:
                return self.get_calibrator(name, version)
            except NotFound:
                # Another process may have activated a different version and deleted this one.
                latest = self._read_pointer(name)
                if latest == version:
                    break
                version = latest
        raise StoreUnavailable(
            f"the active pointer of model {name!r} names calibrator version {version}, which does not exist"
        )

    def active_stamp(self, name: str) -> tuple[int, ...]:
        """A cheap token that changes whenever the model's active version changes.

        One ``stat`` of the pointer: ``(st_mtime_ns, st_ino, st_size)``, or ``()`` while no version is active.
        Every activation replaces the pointer (new inode) and moves its mtime strictly forward, so the stamp
        changes even for activations within one clock tick. NotFound for no model.
        """
        path = self._model_dir(name) / _POINTER_FILE
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            if not self.model_exists(name):
                raise self._not_found(name) from None
            return ()
        except OSError as exc:
            raise _unreadable(exc, self._shown(path)) from exc
        return (info.st_mtime_ns, info.st_ino, info.st_size)

    def change_stamp(self, name: str) -> tuple[Any, Any]:
        """A cheap token that changes whenever the model's metadata or its active version changes.

        Two ``stat`` s (of the metadata file and of the active pointer) on cached string paths, so a cache
        keyed by it costs microseconds per request. Every store write replaces the file it changes (a new
        inode), and the pointer's mtime moves strictly forward, so a change by any worker or replica shows
        at once. ``(None, None)`` for a model that does not exist (yet).
        """
        paths = self._stamp_paths.get(name)
        if paths is None:
            directory = os.path.join(self.root, validate_model_name(name))
            paths = (os.path.join(directory, _MODEL_FILE), os.path.join(directory, _POINTER_FILE))
            if len(self._stamp_paths) > 4096:
                self._stamp_paths.clear()
            self._stamp_paths[name] = paths
        return (_stat_stamp(paths[0]), _stat_stamp(paths[1]))

    # -- operations ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Nothing to release (the S3 store stops its refresher here)."""

    #: Reads are local files: a ``stat`` or a small read, fine on an event loop.
    remote = False

    def serves_from_memory(self, name: str) -> bool:
        """Whether :meth:`change_stamp` answers without a request to a remote store: always (two ``stat`` s)."""
        return True

    def check_writable(self) -> None:
        """Raise StoreUnavailable unless a file can be created, fsynced and removed in the root."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _opened_dir(self.root) as root_fd:
                probe = f".write-probe.{uuid.uuid4().hex}.tmp"
                fd = os.open(
                    probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=root_fd
                )
                try:
                    try:
                        _write_all(fd, b"ok\n")
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                finally:
                    _unlink_quietly(probe, root_fd)
                os.fsync(root_fd)
        except OSError as exc:
            raise _unwritable(exc) from exc

    def cleanup_temp_files(self, *, min_age_s: float = _TEMP_MIN_AGE_S) -> int:
        """Remove leftovers of interrupted writes; return how many entries were removed.

        Temp files (and half-built model directories) are removed only when older than ``min_age_s``
        (60 s by default): the service calls this at start-up, when another worker sharing the store may be
        in the middle of a write, and no write keeps a temp file that long. Tombstones of deleted models are
        dead by construction and are removed whatever their age.
        """
        cutoff = time.time() - min_age_s
        removed = 0
        directories = [self.root]
        try:
            directories += [
                Path(entry.path) / sub
                for entry in os.scandir(self.root)
                if is_model_name(entry.name) and entry.is_dir(follow_symlinks=False)
                for sub in ("", _CALIBRATORS_DIR)
            ]
        except FileNotFoundError:
            return 0
        for directory in directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                is_temp = _TEMP_RE.fullmatch(entry.name) is not None
                is_tombstone = directory == self.root and _TOMBSTONE_RE.fullmatch(entry.name) is not None
                if not (is_temp or is_tombstone):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                    if is_temp and info.st_mtime > cutoff:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        _remove_tree(Path(entry.path))
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    logger.warning("could not remove leftover %s: %s", entry.path, exc)
                    continue
                logger.info("removed leftover %s", entry.path)
                removed += 1
        return removed
