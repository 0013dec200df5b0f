"""A calibrator store as it lies on disk (entries, temp files, invariants), and real file systems under it."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest


def store_entries(store: Path) -> set[str]:
    """Every path under the store, relative to it (directories included)."""
    return {str(path.relative_to(store)) for path in store.rglob("*")} if store.exists() else set()


def temp_files(store: Path) -> list[str]:
    return sorted(entry for entry in store_entries(store) if entry.endswith(".tmp"))


def check_store(store: Path) -> dict[str, dict[str, Any]]:
    """Assert the store's invariants on disk; return ``{model: {"active": v, "versions": {v: document}}}``.

    Invariants: every version file parses as a JSON object naming its model and its own number; every
    ``active`` pointer names an existing version; every version number has its reservation marker.
    """
    state: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(
        path for path in store.iterdir() if path.is_dir() and not path.name.startswith(".")
    ):
        name = model_dir.name
        assert orjson.loads((model_dir / "model.json").read_bytes()), name
        versions: dict[int, dict[str, Any]] = {}
        calibrators = model_dir / "calibrators"
        for path in calibrators.glob("*.json") if calibrators.exists() else ():
            document = orjson.loads(path.read_bytes())  # a torn file fails here
            version = int(path.stem)
            assert document["version"] == version and document["model"] == name, path
            assert (calibrators / ".reserved" / str(version)).exists(), f"{path}: no reservation marker"
            versions[version] = document
        pointer = model_dir / "active"
        active = int(pointer.read_text()) if pointer.exists() else None
        assert active is None or active in versions, f"{name}: active pointer names missing version {active}"
        state[name] = {"active": active, "versions": versions}
    return state


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path``; pytest.skip where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0755",
            f"calibserve-{uuid.uuid4().hex[:8]}",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)
