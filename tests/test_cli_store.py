"""``calibserve store copy SRC DST`` as a user runs it: a directory store to a bucket on moto's real S3 server
and back, every model, version, pointer and TorchScript file intact; a second run changes nothing; bad input
exits 2 with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.store import CalibratorStore
from service.stores import open_store
from tests.helpers.cli import run_all
from tests.helpers.s3 import S3Endpoint


def _copy(source: str, target: str, cwd: Path, endpoint: S3Endpoint) -> Any:
    return run_all({"copy": ["store", "copy", source, target]}, cwd, env=endpoint.environment)["copy"]


def _contents(store: Any) -> dict[str, Any]:
    """Everything a store holds, in a form to compare between stores."""
    contents = {}
    for metadata in store.list_models(limit=1000)[0]:
        name = metadata["name"]
        path = store.torchscript_path(name)
        contents[name] = {
            "metadata": metadata,
            "versions": store.list_calibrators(name, limit=1000)[0],
            "active": store.active_version(name),
            "torchscript": path.read_bytes() if path is not None else None,
        }
    return contents


@pytest.fixture
def source(tmp_path: Path) -> CalibratorStore:
    store = CalibratorStore(tmp_path / "source")
    store.put_model("digits", {"num_classes": 10, "class_names": [str(i) for i in range(10)]})
    store.put_model("binary", {"num_classes": 1})
    for temperature in (1.5, 2.0, 2.5):
        store.add_calibrator(
            "digits", {"format_version": 1, "method": "temperature", "temperature": temperature}
        )
    store.activate("digits", 1)
    store.delete_calibrator("digits", 2)  # a gap in the numbers: copied as it is
    store.put_torchscript("binary", b"TorchScript bytes \x00\xff")
    return store


def test_directory_to_bucket_and_back_copies_everything_and_is_idempotent(
    source: CalibratorStore, moto_s3: S3Endpoint, tmp_path: Path
) -> None:
    bucket = moto_s3.new_bucket()
    url = f"s3://{bucket}/migrated"
    first = _copy(str(source.root), url, tmp_path, moto_s3)
    assert first.returncode == 0, first.stderr
    assert (
        "2 models: 2 versions written, 0 already there, 1 pointers moved, 1 TorchScript files" in first.stderr
    )
    expected = _contents(source)
    assert [v["version"] for v in expected["digits"]["versions"]] == [3, 1]
    assert _contents(open_store(url, refresh_s=0, cache_dir=tmp_path / "cache")) == expected

    again = _copy(str(source.root), url, tmp_path, moto_s3)
    assert again.returncode == 0, again.stderr
    assert "0 versions written, 2 already there, 0 pointers moved, 0 TorchScript files" in again.stderr

    back = tmp_path / "back"
    returned = _copy(url, f"file://{back}", tmp_path, moto_s3)
    assert returned.returncode == 0, returned.stderr
    assert _contents(CalibratorStore(back)) == expected
    # The copy keeps allocating after the highest number it received, like the source.
    assert CalibratorStore(back).add_calibrator("digits", {"temperature": 3.0})["version"] == 4


def test_bad_input_exits_2_with_one_line(
    source: CalibratorStore, moto_s3: S3Endpoint, tmp_path: Path
) -> None:
    conflicting = CalibratorStore(tmp_path / "conflicting")
    conflicting.put_model("digits", {"num_classes": 10})
    conflicting.add_calibrator("digits", {"temperature": 9.0})  # another document under number 1
    cases = {
        "missing source": ([str(tmp_path / "nowhere"), str(tmp_path / "x")], "is not a directory"),
        "unsupported scheme": (["ftp://host/store", str(tmp_path / "x")], "unsupported store URL ftp://"),
        "same store": ([str(source.root), f"file://{source.root}"], "the same store"),
        "missing bucket": ([str(source.root), "s3://no-such-bucket-here/p"], "does not exist"),
        "bad bucket name": ([str(source.root), "s3://Bad_Bucket/p"], "invalid S3 bucket name"),
        "different version": ([str(source.root), str(conflicting.root)], "different calibrator version 1"),
    }
    runs = run_all(
        {name: ["store", "copy", *arguments] for name, (arguments, _) in cases.items()},
        tmp_path,
        env=moto_s3.environment,
    )
    for name, (_, reason) in cases.items():
        run = runs[name]
        assert run.returncode == 2, (name, run.stderr)
        errors = [line for line in run.stderr.splitlines() if line.startswith("calibserve: error:")]
        assert len(errors) == 1 and reason in errors[0], (name, run.stderr)
