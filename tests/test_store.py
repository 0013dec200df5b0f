"""The calibrator stores: round trips, name validation, version allocation, failure paths, corruption, change
stamps, paging, deletion and clean-up.

The tests of the interface run on both stores (``backend`` is parametrised): the directory store on real files
and the S3 store on moto's real S3 server (``refresh_s=0``, so a second instance reads what the first wrote at
once, as a second directory-store instance does). Tests of what only a directory has (fsync, link(2), temp
files, inode stamps) run on the directory store; S3 faults (server down, missing bucket) on the S3 store.
"""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from service.names import MODEL_NAME_PATTERN, validate_model_name
from service.store import CalibratorStore
from service.store_s3 import S3CalibratorStore
from tests.helpers.s3 import S3Endpoint


def _doc(temperature: float = 1.5, **extra: Any) -> dict[str, Any]:
    return {"format_version": 1, "method": "temperature", "temperature": temperature, **extra}


def _tree(root: Path) -> list[tuple[str, bytes | None]]:
    """Every path under root with the content of files: a snapshot to compare before and after."""
    if not root.exists():
        return []
    return sorted(
        (str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*")
    )


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


class Backend:
    """One store location (a directory, or a fresh bucket on moto), instances of it, and its raw contents."""

    def __init__(self, kind: str, tmp_path: Path, endpoint: S3Endpoint | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.bucket = endpoint.new_bucket() if endpoint is not None else None

    def make(self, where: str = "store") -> Any:
        """A new instance on location ``where`` (a fresh instance is another process's view)."""
        if self.bucket is None:
            return CalibratorStore(self.tmp_path / where)
        return S3CalibratorStore(
            f"s3://{self.bucket}/{where}", refresh_s=0, cache_dir=self.tmp_path / "cache" / where
        )

    def snapshot(self, where: str = "store") -> list[tuple[str, bytes | None]]:
        """Every entry of the location with its content: to compare before and after."""
        if self.bucket is None:
            return _tree(self.tmp_path / where)
        client = self.endpoint.client()  # type: ignore[union-attr]
        found = client.list_objects_v2(Bucket=self.bucket, Prefix=f"{where}/").get("Contents", [])
        return sorted(
            (item["Key"], client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read())
            for item in found
        )

    def read(self, relative: str, where: str = "store") -> bytes:
        if self.bucket is None:
            return (self.tmp_path / where / relative).read_bytes()
        client = self.endpoint.client()  # type: ignore[union-attr]
        return client.get_object(Bucket=self.bucket, Key=f"{where}/{relative}")["Body"].read()

    def write(self, relative: str, data: bytes, where: str = "store") -> None:
        """Place an entry by hand (as an operator or a corruption would)."""
        if self.bucket is None:
            path = self.tmp_path / where / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            client = self.endpoint.client()  # type: ignore[union-attr]
            client.put_object(Bucket=self.bucket, Key=f"{where}/{relative}", Body=data)


@pytest.fixture(params=["directory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    endpoint = request.getfixturevalue("moto_s3") if request.param == "s3" else None
    return Backend(request.param, tmp_path, endpoint)


@pytest.fixture
def store(backend: Backend) -> Any:
    s = backend.make()
    s.put_model("m", {"num_classes": 3})
    return s


# What only a directory has (fsync, link(2), temp files, inode stamps): the store fixture on a directory only.
directory_only = pytest.mark.parametrize("backend", ["directory"], indirect=True)


# -- round trips ---------------------------------------------------------------------------------------------


def test_model_round_trip_and_replace_keeps_calibrators(backend: Backend, tmp_path: Path) -> None:
    s = backend.make("not-yet-created")
    metadata = {"num_classes": 3, "class_names": ["a", "b", "c"]}
    assert not s.model_exists("m")
    assert s.put_model("m", metadata) == {**metadata, "name": "m"}
    assert metadata == {"num_classes": 3, "class_names": ["a", "b", "c"]}  # caller's dict untouched
    assert s.get_model("m") == {**metadata, "name": "m"}
    assert s.model_exists("m")

    s.add_calibrator("m", _doc())
    s.put_torchscript("m", b"torchscript bytes")
    assert s.put_model("m", {"num_classes": 3, "owner": "x"}) == {"num_classes": 3, "owner": "x", "name": "m"}
    assert s.get_model("m")["owner"] == "x"
    assert s.active_version("m") == 1
    assert s.torchscript_path("m") is not None
    # A reader in another process (a fresh instance) sees the same thing.
    assert backend.make("not-yet-created").get_model("m")["owner"] == "x"
    assert _temp_files(tmp_path) == []


def test_missing_model_is_not_found_and_writes_nothing(backend: Backend) -> None:
    s = backend.make()
    s.put_model("other", {"num_classes": 2})
    before = backend.snapshot()
    for call in (
        lambda: s.get_model("m"),
        lambda: s.delete_model("m"),
        lambda: s.add_calibrator("m", _doc()),
        lambda: s.get_calibrator("m", 1),
        lambda: s.list_calibrators("m"),
        lambda: s.delete_calibrator("m", 1),
        lambda: s.activate("m", 1),
        lambda: s.active_version("m"),
        lambda: s.active_calibrator("m"),
        lambda: s.active_stamp("m"),
        lambda: s.put_torchscript("m", b"x"),
        lambda: s.torchscript_path("m"),
    ):
        with pytest.raises(NotFound, match="'m' does not exist"):
            call()
    assert backend.snapshot() == before


def test_a_model_json_copied_in_by_hand_is_a_model(backend: Backend) -> None:
    backend.write("m/model.json", b'{"num_classes": 2}')
    s = backend.make()
    assert s.get_model("m") == {"num_classes": 2, "name": "m"}
    assert s.add_calibrator("m", _doc())["version"] == 1
    assert s.active_version("m") == 1


def test_torchscript_round_trip(store: Any) -> None:
    assert store.torchscript_path("m") is None
    payload = bytes(range(256)) * 100
    path = store.put_torchscript("m", payload)
    assert store.torchscript_path("m") == path == store.root / "m" / "model.pt"
    assert path.read_bytes() == payload
    store.put_torchscript("m", b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(InvalidInput):
        store.put_torchscript("m", "not bytes")  # type: ignore[arg-type]


def test_calibrator_round_trip(store: Any, backend: Backend) -> None:
    document = _doc(2.0, model="someone-else", version=99, params={"temperature": 2.0})
    document["bins"] = np.linspace(0.0, 1.0, 5)  # numpy arrays are stored as lists
    stored = store.add_calibrator("m", document)
    assert stored["model"] == "m" and stored["version"] == 1
    assert stored["bins"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert document["version"] == 99 and document["model"] == "someone-else"  # caller's dict untouched
    assert store.get_calibrator("m", 1) == stored
    assert orjson.loads(backend.read("m/calibrators/1.json")) == stored
    assert store.active_version("m") == 1 and store.active_calibrator("m") == stored

    staged = store.add_calibrator("m", _doc(3.0), activate=False)
    assert staged["version"] == 2
    assert store.active_version("m") == 1
    assert store.activate("m", 2) == staged
    assert store.active_calibrator("m") == staged
    pointer = backend.read("m/active")
    assert (pointer == b"2\n") if backend.kind == "directory" else (orjson.loads(pointer)["version"] == 2)


def test_no_active_version_before_any_fit(store: Any) -> None:
    assert store.active_version("m") is None
    assert store.active_calibrator("m") is None
    assert store.active_stamp("m") == ()
    assert store.list_calibrators("m") == ([], None)


def test_unserialisable_document_is_rejected_before_a_number_is_claimed(store: Any, backend: Backend) -> None:
    before = backend.snapshot()
    with pytest.raises(InvalidInput) as info:
        store.add_calibrator("m", _doc(params=object()))
    assert info.value.field == "document"
    with pytest.raises(InvalidInput):
        store.add_calibrator("m", [1, 2])  # type: ignore[arg-type]
    assert backend.snapshot() == before
    assert store.add_calibrator("m", _doc())["version"] == 1


# -- names ---------------------------------------------------------------------------------------------------

BAD_NAMES = [
    "",
    ".",
    "..",
    "../escape",
    ".hidden",
    "a/b",
    "a\\b",
    "nul\x00byte",
    "trailing-newline\n",
    "space name",
    "-leading-dash",
    "é",
    "x" * 65,
    "x" * 300,
    None,
    42,
]


def _every_method(s: Any, name: Any) -> list[Any]:
    return [
        lambda: s.put_model(name, {"num_classes": 2}),
        lambda: s.get_model(name),
        lambda: s.model_exists(name),
        lambda: s.delete_model(name),
        lambda: s.put_torchscript(name, b"x"),
        lambda: s.torchscript_path(name),
        lambda: s.add_calibrator(name, _doc()),
        lambda: s.get_calibrator(name, 1),
        lambda: s.list_calibrators(name),
        lambda: s.delete_calibrator(name, 1),
        lambda: s.activate(name, 1),
        lambda: s.active_version(name),
        lambda: s.active_calibrator(name),
        lambda: s.active_stamp(name),
        lambda: s.change_stamp(name),
    ]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_names_are_rejected_by_every_method_and_write_nothing(backend: Backend, name: Any) -> None:
    s = backend.make()
    s.put_model("m", {"num_classes": 2})
    s.add_calibrator("m", _doc())
    before = backend.snapshot()
    for call in _every_method(s, name):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "name"
    assert backend.snapshot() == before


@pytest.mark.parametrize("name", ["a", "0", "A.b_c-1", "model.v2", "x" * 64, "a..b"])
def test_valid_names_are_accepted(backend: Backend, name: str) -> None:
    s = backend.make()
    assert validate_model_name(name) == name
    s.put_model(name, {"num_classes": 2})
    assert orjson.loads(backend.read(f"{name}/model.json")) == {"num_classes": 2, "name": name}
    assert s.list_models()[0] == [{"num_classes": 2, "name": name}]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70) | st.from_regex(MODEL_NAME_PATTERN, fullmatch=True))
def test_an_accepted_name_is_always_one_plain_path_component(name: str) -> None:
    root = Path("/srv/store")
    try:
        validate_model_name(name)
    except InvalidInput:
        return
    assert 1 <= len(name) <= 64 and name.isascii() and name[0].isalnum()
    assert (root / name).parent == root and os.path.normpath(root / name) == str(root / name)


# -- versions ------------------------------------------------------------------------------------------------


def test_deleting_the_highest_version_never_frees_its_number(backend: Backend) -> None:
    s = backend.make()
    s.put_model("m", {"num_classes": 2})
    for _ in range(3):
        s.add_calibrator("m", _doc())
    s.activate("m", 1)
    s.delete_calibrator("m", 3)
    with pytest.raises(NotFound):
        s.get_calibrator("m", 3)
    assert s.add_calibrator("m", _doc())["version"] == 4
    s.activate("m", 1)
    s.delete_calibrator("m", 4)
    s.delete_calibrator("m", 2)
    # A fresh instance (a restarted worker) knows no more than the disk.
    assert backend.make().add_calibrator("m", _doc())["version"] == 5
    assert [d["version"] for d in s.list_calibrators("m")[0]] == [5, 1]


def test_delete_active_is_conflict_and_unknown_versions_are_not_found(store: Any) -> None:
    store.add_calibrator("m", _doc())
    store.add_calibrator("m", _doc(), activate=False)
    with pytest.raises(Conflict, match="active"):
        store.delete_calibrator("m", 1)
    assert store.get_calibrator("m", 1)["version"] == 1
    with pytest.raises(NotFound, match="no calibrator version 7"):
        store.activate("m", 7)
    with pytest.raises(NotFound):
        store.delete_calibrator("m", 7)
    assert store.active_version("m") == 1
    store.delete_calibrator("m", 2)
    with pytest.raises(NotFound):
        store.activate("m", 2)
    assert store.active_version("m") == 1


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1", None])
def test_bad_version_numbers_are_invalid_input(store: Any, version: Any) -> None:
    for call in (store.get_calibrator, store.activate, store.delete_calibrator):
        with pytest.raises(InvalidInput) as info:
            call("m", version)
        assert info.value.field == "version"


def test_a_version_file_placed_by_hand_is_skipped_not_overwritten(store: Any, backend: Backend) -> None:
    backend.write("m/calibrators/1.json", b'{"version": 1, "by": "hand"}')
    assert store.add_calibrator("m", _doc())["version"] == 2
    assert orjson.loads(backend.read("m/calibrators/1.json"))["by"] == "hand"


@directory_only
def test_without_hard_links_the_version_is_published_by_rename(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert store.add_calibrator("m", _doc())["version"] == 1
    assert store.add_calibrator("m", _doc())["version"] == 2
    assert store.get_calibrator("m", 2)["version"] == 2
    assert _temp_files(store.root) == []


PROCESSES, THREADS, PER_THREAD = 2, 5, 5


def _add_from_process(root: str, start: Any, results: Any, process_index: int) -> None:
    """Child process body: THREADS threads each add PER_THREAD calibrators at once."""
    s = CalibratorStore(root)
    thread_start = threading.Barrier(THREADS)
    versions: list[int] = []
    errors: list[str] = []

    def work(thread_index: int) -> None:
        thread_start.wait(timeout=60)
        for i in range(PER_THREAD):
            try:
                stored = s.add_calibrator("m", _doc(writer=f"{process_index}-{thread_index}-{i}"))
                versions.append(stored["version"])
            except Exception as exc:  # reported to the parent, which fails the test
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    start.wait(timeout=60)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((versions, errors))


def test_concurrent_processes_and_threads_get_distinct_contiguous_versions(tmp_path: Path) -> None:
    s = CalibratorStore(tmp_path)
    s.put_model("m", {"num_classes": 2})
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    processes = [
        context.Process(target=_add_from_process, args=(str(tmp_path), start, results, p))
        for p in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [errors for _, errors in outcomes] == [[]] * PROCESSES
    total = PROCESSES * THREADS * PER_THREAD
    returned = sorted(v for versions, _ in outcomes for v in versions)
    assert returned == list(range(1, total + 1))  # distinct, contiguous, none lost

    files = sorted(int(p.stem) for p in (tmp_path / "m" / "calibrators").glob("*.json"))
    assert files == returned
    writers = set()
    for version in files:
        stored = orjson.loads((tmp_path / "m" / "calibrators" / f"{version}.json").read_bytes())
        assert stored["version"] == version and stored["model"] == "m"
        writers.add(stored["writer"])
    assert len(writers) == total  # every document written is the one stored under its number
    assert s.active_version("m") in files
    assert _temp_files(tmp_path) == []


# -- failing writes ------------------------------------------------------------------------------------------


def _fail_call(monkeypatch: pytest.MonkeyPatch, function_name: str, on_call: int, code: int) -> None:
    """Make the on_call-th call of os.<function_name> fail with OSError(code)."""
    real = getattr(os, function_name)
    calls = 0

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, function_name, failing)


# add_calibrator(activate=True) calls os.fsync on: the reservation directory, the version temp file, the
# calibrators directory, the pointer temp file; os.replace once (the pointer); os.link once (the version);
# os.open on the model, calibrators and reservation directories, the reservation marker, the temp file,
# the lock file, the pointer temp file.
@directory_only
@pytest.mark.parametrize(
    ("function_name", "on_call", "code"),
    [
        ("fsync", 1, errno.EROFS),
        ("fsync", 2, errno.EIO),
        ("fsync", 3, errno.EIO),
        ("fsync", 4, errno.ENOSPC),
        ("link", 1, errno.ENOSPC),
        ("replace", 1, errno.EROFS),
        ("write", 1, errno.ENOSPC),
        ("write", 2, errno.ENOSPC),
        ("open", 4, errno.EROFS),
        ("open", 5, errno.ENOSPC),
        ("open", 6, errno.EROFS),
        ("open", 7, errno.ENOSPC),
    ],
)
def test_failed_add_leaves_nothing_and_keeps_the_active_version(
    store: Any, monkeypatch: pytest.MonkeyPatch, function_name: str, on_call: int, code: int
) -> None:
    store.add_calibrator("m", _doc(1.0))
    _fail_call(monkeypatch, function_name, on_call, code)
    stamp = store.active_stamp("m")
    with pytest.raises(StoreUnavailable, match="calibrator store is not writable: "):
        store.add_calibrator("m", _doc(2.0))
    monkeypatch.undo()
    assert _temp_files(store.root) == []
    assert [d["version"] for d in store.list_calibrators("m")[0]] == [1]
    assert store.active_version("m") == 1 and store.active_stamp("m") == stamp
    assert store.add_calibrator("m", _doc(3.0))["version"] >= 2  # the store still works afterwards


@directory_only
def test_failing_directory_fsync_after_the_pointer_moved_keeps_pointer_and_version_consistent(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_calibrator("m", _doc(1.0))
    _fail_call(monkeypatch, "fsync", 5, errno.EIO)  # the model directory, after os.replace of the pointer
    with pytest.raises(StoreUnavailable):
        store.add_calibrator("m", _doc(2.0))
    monkeypatch.undo()
    # The pointer already names version 2 and cannot be rolled back: version 2 must then still exist.
    assert store.active_version("m") == 2
    assert store.active_calibrator("m")["temperature"] == 2.0
    assert _temp_files(store.root) == []


@directory_only
def test_a_real_write_error_mid_file_removes_the_temp_file(store: Any) -> None:
    # RLIMIT_FSIZE makes the kernel fail write(2) with EFBIG once the file would pass the limit: a genuine
    # short/failed write, not a mock.
    store.add_calibrator("m", _doc(1.0))
    big = _doc(2.0, thresholds=list(range(20_000)))
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(StoreUnavailable, match="not writable: File too large"):
            store.add_calibrator("m", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert _temp_files(store.root) == []
    assert [d["version"] for d in store.list_calibrators("m")[0]] == [1]
    assert store.active_version("m") == 1
    assert store.add_calibrator("m", big)["version"] == 3  # 2 was claimed by the failed write


@directory_only
def test_a_calibrators_path_that_is_a_file_is_store_unavailable(store: Any) -> None:
    calibrators = store.root / "m" / "calibrators"
    shutil.rmtree(calibrators)
    calibrators.write_bytes(b"not a directory")
    with pytest.raises(StoreUnavailable, match="not writable: Not a directory"):
        store.add_calibrator("m", _doc())
    assert _temp_files(store.root) == []


@directory_only
def test_failed_activate_keeps_the_previous_pointer(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add_calibrator("m", _doc(1.0))
    store.add_calibrator("m", _doc(2.0), activate=False)
    _fail_call(monkeypatch, "replace", 1, errno.EROFS)
    with pytest.raises(StoreUnavailable, match="Read-only file system"):
        store.activate("m", 2)
    monkeypatch.undo()
    assert store.active_version("m") == 1
    assert _temp_files(store.root) == []


def test_failed_put_model_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = CalibratorStore(tmp_path)
    _fail_call(monkeypatch, "fsync", 1, errno.ENOSPC)
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        s.put_model("m", {"num_classes": 2})
    monkeypatch.undo()
    assert _tree(tmp_path) == []
    assert not s.model_exists("m")


@directory_only
def test_failed_delete_model_keeps_the_model(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add_calibrator("m", _doc())
    _fail_call(monkeypatch, "rename", 1, errno.EROFS)
    with pytest.raises(StoreUnavailable):
        store.delete_model("m")
    monkeypatch.undo()
    assert store.active_calibrator("m")["version"] == 1


def test_check_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    CalibratorStore(tmp_path / "new").check_writable()
    assert (tmp_path / "new").is_dir() and _tree(tmp_path / "new") == []

    _fail_call(monkeypatch, "fsync", 1, errno.EROFS)
    with pytest.raises(StoreUnavailable, match="not writable: Read-only file system"):
        CalibratorStore(tmp_path / "new").check_writable()
    monkeypatch.undo()
    assert _tree(tmp_path / "new") == []

    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StoreUnavailable):
        CalibratorStore(tmp_path / "a-file").check_writable()


# -- corruption ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": 1', b"[1, 2]", b"\xff\xfe"])
def test_corrupt_version_file_is_store_unavailable_naming_the_file(backend: Backend, content: bytes) -> None:
    store = backend.make()
    store.put_model("m", {"num_classes": 3})
    store.add_calibrator("m", _doc())
    store.add_calibrator("m", _doc(), activate=False)
    backend.write("m/calibrators/1.json", content)
    store = backend.make()  # a process that has not read the versions yet
    for call in (
        lambda: store.get_calibrator("m", 1),
        lambda: store.active_calibrator("m"),
        lambda: store.list_calibrators("m"),
    ):
        with pytest.raises(StoreUnavailable, match=r"m/calibrators/1\.json is corrupt"):
            call()
    backend.write("m/calibrators/2.json", content)
    with pytest.raises(StoreUnavailable, match=r"2\.json is corrupt"):
        store.activate("m", 2)  # a corrupt version is never activated
    assert store.active_version("m") == 1


def test_corrupt_model_json_and_pointer_are_store_unavailable(store: Any, backend: Backend) -> None:
    store.add_calibrator("m", _doc())
    backend.write("m/active", b"one\n")
    with pytest.raises(StoreUnavailable, match=r"m/active is corrupt"):
        store.active_version("m")
    backend.write("m/model.json", b"\x00garbage")
    with pytest.raises(StoreUnavailable, match=r"m/model\.json is corrupt"):
        store.get_model("m")
    with pytest.raises(StoreUnavailable, match=r"m/model\.json is corrupt"):
        store.list_models()


# -- change stamps -------------------------------------------------------------------------------------------


@directory_only
def test_active_stamp_changes_on_every_activation_within_one_clock_tick(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_calibrator("m", _doc(1.0))
    store.add_calibrator("m", _doc(2.0))
    # No fsync (activations take microseconds, many per kernel timestamp tick) and a frozen clock: only the
    # store's strictly increasing mtime keeps the stamps apart once inode numbers come round again.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000_000)
    stamps = [store.active_stamp("m")]
    for i in range(200):
        store.activate("m", 1 + i % 2)
        stamps.append(store.active_stamp("m"))
    assert len(set(stamps)) == len(stamps)
    mtimes = [s[0] for s in stamps]
    assert all(later > earlier for earlier, later in itertools.pairwise(mtimes))
    # A worker that cached at stamp s reloads iff the stamp moved.
    assert store.active_stamp("m") == stamps[-1]


# -- paging --------------------------------------------------------------------------------------------------


def test_list_models_pages_by_name(backend: Backend) -> None:
    s = backend.make()
    names = ["b", "a", "Z", "c.2", "c-1", "0"]
    for n in names:
        s.put_model(n, {"num_classes": 2})
    backend.write(".hidden/model.json", b"{}")
    backend.write("no-metadata/calibrators/1.json", b"{}")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        items, cursor = s.list_models(limit=4 if pages == 0 else 1, cursor=cursor)
        seen += [item["name"] for item in items]
        pages += 1
        if cursor is None:
            break
    assert seen == sorted(names)
    assert pages == 3
    assert s.list_models(limit=6) == ([s.get_model(n) for n in sorted(names)], None)
    assert s.list_models(limit=5)[1] == "c-1"  # "no-metadata" after "c.2" is no model
    assert backend.make("absent").list_models() == ([], None)
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": True}, {"cursor": "../x"}):
        with pytest.raises(InvalidInput) as info:
            s.list_models(**bad)
        assert info.value.field in bad


def test_list_calibrators_pages_newest_first(store: Any) -> None:
    for t in range(7):
        store.add_calibrator("m", _doc(float(t)))
    store.delete_calibrator("m", 4)
    page, cursor = store.list_calibrators("m", limit=3)
    assert [d["version"] for d in page] == [7, 6, 5] and cursor == "5"
    page, cursor = store.list_calibrators("m", limit=3, cursor=cursor)
    assert [d["version"] for d in page] == [3, 2, 1] and cursor is None
    page, cursor = store.list_calibrators("m", limit=2, cursor="3")
    assert [d["version"] for d in page] == [2, 1] and cursor is None
    assert store.list_calibrators("m", limit=6) == (
        [store.get_calibrator("m", v) for v in (7, 6, 5, 3, 2, 1)],
        None,
    )
    for bad in ({"limit": 0}, {"cursor": "x"}, {"cursor": "0"}, {"cursor": "-3"}):
        with pytest.raises(InvalidInput) as info:
            store.list_calibrators("m", **bad)
        assert info.value.field in bad


# -- deletion and clean-up -----------------------------------------------------------------------------------


def test_delete_model_leaves_no_directory_and_a_new_model_starts_afresh(store: Any, backend: Backend) -> None:
    store.add_calibrator("m", _doc())
    store.put_torchscript("m", b"ts")
    store.put_model("keep", {"num_classes": 2})
    store.delete_model("m")
    # nothing of "m" is left, no tombstone either
    assert {entry.split("/")[int(backend.kind == "s3")] for entry, _ in backend.snapshot()} == {"keep"}
    assert not store.model_exists("m")
    with pytest.raises(NotFound):
        store.get_model("m")
    with pytest.raises(NotFound):
        store.delete_model("m")
    assert [m["name"] for m in store.list_models()[0]] == ["keep"]
    store.put_model("m", {"num_classes": 4})
    assert store.active_version("m") is None and store.torchscript_path("m") is None
    assert store.add_calibrator("m", _doc())["version"] == 1


@directory_only
def test_cleanup_removes_only_old_temp_files_and_every_tombstone(store: Any) -> None:
    store.add_calibrator("m", _doc())
    calibrators = store.root / "m" / "calibrators"
    old = time.time() - 3600
    stale_file = calibrators / f".2.json.{'a' * 32}.tmp"
    fresh_file = calibrators / f".3.json.{'b' * 32}.tmp"
    stale_pointer = store.root / "m" / f".active.{'c' * 32}.tmp"
    stale_dir = store.root / f".n.{'d' * 32}.tmp"
    tombstone = store.root / f".gone.deleted-{'e' * 32}"
    for path in (stale_file, fresh_file, stale_pointer):
        path.write_bytes(b"partial")
    (stale_dir / "calibrators").mkdir(parents=True)
    (tombstone / "calibrators").mkdir(parents=True)
    (tombstone / "calibrators" / "1.json").write_bytes(b"{}")
    for path in (stale_file, stale_pointer, stale_dir):
        os.utime(path, (old, old))
    before = {path for path, _ in _tree(store.root)}

    assert store.cleanup_temp_files() == 4
    removed = [str(p.relative_to(store.root)) for p in (stale_file, stale_pointer, stale_dir, tombstone)]
    expected = {p for p in before if not any(p == r or p.startswith(r + "/") for r in removed)}
    assert {path for path, _ in _tree(store.root)} == expected
    assert fresh_file.exists()
    assert store.cleanup_temp_files(min_age_s=0) == 1 and not fresh_file.exists()
    assert store.get_calibrator("m", 1)["version"] == 1
    assert CalibratorStore(store.root / "absent").cleanup_temp_files() == 0


def test_every_activation_changes_both_stamps_and_a_second_instance_sees_it(backend: Backend) -> None:
    writer, reader = backend.make(), backend.make()
    writer.put_model("m", {"num_classes": 2})
    assert reader.change_stamp("m")[1] is None
    writer.add_calibrator("m", _doc(1.0))
    writer.add_calibrator("m", _doc(2.0))
    stamps = [reader.change_stamp("m")]
    for i in range(20):
        writer.activate("m", 1 + i % 2)  # the same two versions again and again: still a new stamp each time
        stamps.append(reader.change_stamp("m"))
        assert reader.active_version("m") == 1 + i % 2
    assert len(set(stamps)) == len(stamps)
    assert reader.change_stamp("unknown") == (None, None)


# -- S3 only: faults and the cached view -------------------------------------------------------------------


def test_s3_conditional_claims_and_pointer_objects(moto_s3: S3Endpoint, tmp_path: Path) -> None:
    backend = Backend("s3", tmp_path, moto_s3)
    s = backend.make()
    s.put_model("m", {"num_classes": 2})
    s.add_calibrator("m", _doc())
    s.add_calibrator("m", _doc(), activate=False)
    s.delete_calibrator("m", 2)
    keys = [key for key, _ in backend.snapshot()]
    assert keys == [
        "store/m/active",
        "store/m/calibrators/.deleted/2",
        "store/m/calibrators/.reserved/1",
        "store/m/calibrators/.reserved/2",
        "store/m/calibrators/1.json",
        "store/m/model.json",
    ]
    # A version object is never overwritten, even by a writer that believes the number is free.
    with pytest.raises(moto_s3.client().exceptions.ClientError, match="PreconditionFailed"):
        moto_s3.client().put_object(
            Bucket=backend.bucket, Key="store/m/calibrators/1.json", Body=b"{}", IfNoneMatch="*"
        )


def test_s3_missing_bucket_is_store_unavailable_saying_so(moto_s3: S3Endpoint, tmp_path: Path) -> None:
    s = S3CalibratorStore("s3://no-such-bucket-here/p", refresh_s=0, cache_dir=tmp_path)
    for call in (s.check_writable, lambda: s.put_model("m", {}), s.list_models):
        with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket-here' does not exist"):
            call()


def test_s3_store_down_writes_fail_and_the_cached_view_keeps_serving(tmp_path: Path) -> None:
    from tests.helpers.s3 import moto_server

    with moto_server() as endpoint:
        bucket = endpoint.new_bucket()
        saved = {key: os.environ.get(key) for key in endpoint.environment}
        os.environ.update(endpoint.environment)
        try:
            s = S3CalibratorStore(f"s3://{bucket}/p", refresh_s=0.05, cache_dir=tmp_path)
            s.put_model("m", {"num_classes": 2})
            stored = s.add_calibrator("m", _doc(1.5))  # the bucket goes away right after this fit
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    # The server is gone (its port refuses connections): a bounded number of retries, then 503s.
    with pytest.raises(StoreUnavailable, match="unreachable"):
        s.add_calibrator("m", _doc(2.0))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        s.check_writable()
    time.sleep(0.1)  # older than refresh_s: a reader would refresh, and cannot
    stamp = s.change_stamp("m")  # the hot path keeps its cached view: the fit it made itself
    assert stamp[0] is not None and stamp[1] is not None
    assert s.active_calibrator("m") == stored and s.active_version("m") == 1
    assert s.change_stamp("m") == stamp
    assert s.fault is not None and "unreachable" in s.fault
    assert s.view_age_s > 0
    s.close()


def test_import_calibrator_keeps_the_number_and_is_idempotent(store: Any) -> None:
    document = {**_doc(2.0), "version": 7, "model": "elsewhere"}
    assert store.import_calibrator("m", document) is True
    assert store.get_calibrator("m", 7) == {**document, "model": "m"}
    assert store.import_calibrator("m", document) is False  # the same document again: nothing to do
    with pytest.raises(Conflict, match="different calibrator version 7"):
        store.import_calibrator("m", {**document, "temperature": 3.0})
    assert store.active_version("m") is None  # imported inactive
    assert store.add_calibrator("m", _doc())["version"] == 8  # numbering goes on after it
    with pytest.raises(InvalidInput):
        store.import_calibrator("m", _doc())  # no version


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_s3_throttling_and_5xx_are_retried_a_bounded_number_of_times_then_503(
    moto_s3: S3Endpoint, tmp_path: Path, status: int, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.store_s3 import RETRY_ATTEMPTS
    from tests.helpers.s3 import FaultyS3

    faulty = FaultyS3(moto_s3)
    try:
        for key, value in faulty.endpoint.environment.items():
            monkeypatch.setenv(key, value)
        bucket = moto_s3.new_bucket()
        s = S3CalibratorStore(f"s3://{bucket}/p", refresh_s=0, cache_dir=tmp_path)
        s.put_model("m", {"num_classes": 2})
        # fewer faults than attempts: botocore's backoff rides them out and the write succeeds, once
        faulty.fail_next(RETRY_ATTEMPTS - 1, status, code)
        stored = s.add_calibrator("m", _doc(1.5))
        assert faulty.faults_answered == RETRY_ATTEMPTS - 1
        assert s.get_calibrator("m", stored["version"]) == stored and s.active_version("m") == 1
        # as many faults as attempts: the call gives up after exactly RETRY_ATTEMPTS tries and says why
        before = faulty.requests
        faulty.fail_next(RETRY_ATTEMPTS, status, code)
        with pytest.raises(StoreUnavailable) as raised:
            s.add_calibrator("m", _doc(2.0))
        assert faulty.requests - before == RETRY_ATTEMPTS  # one call, its bounded retries, no more
        assert str(status) in str(raised.value) or code in str(raised.value)
        # the faults are over: the store carries on where it was (the failed fit claimed nothing)
        assert s.active_version("m") == 1
        assert s.add_calibrator("m", _doc(2.5))["version"] == 2
        assert [item["version"] for item in s.list_calibrators("m")[0]] == [2, 1]
        s.close()
    finally:
        faulty.close()
