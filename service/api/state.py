"""What one worker holds: the store, the model registry, and a cache of active calibrators.

Workers share the store on disk. The cache keys each model's active calibrator by the ``active`` pointer's
stat stamp, so a fit or activation made by any worker (or replica) is served by all from the next request on,
for the price of one ``stat`` per request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from service import workflows
from service.api.batching import DynamicBatcher
from service.config import Settings
from service.errors import InvalidInput, NotFound, NotReady
from service.registry import ModelRegistry
from service.store import CalibratorStore

logger = logging.getLogger("calibserve.state")


@dataclass(frozen=True)
class ActiveCalibrator:
    """A loaded calibrator with its document; ``version`` None means no calibrator (plain softmax)."""

    version: int | None
    calibrator: Any
    document: dict | None
    stamp: Any = None


IDENTITY = ActiveCalibrator(version=None, calibrator=None, document=None)


@dataclass
class AppState:
    settings: Settings
    store: CalibratorStore
    registry: ModelRegistry
    ready: bool = False
    batcher: DynamicBatcher | None = None
    _active: dict[str, ActiveCalibrator] = field(default_factory=dict)
    _pinned: dict[tuple[str, int], ActiveCalibrator] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------------------------------ start-up

    def start(self) -> None:
        self.store.cleanup_temp_files()
        self.registry.load_all()
        for name in self.store_torchscript_models():
            self.sync_uploaded_model(name)
        self.ready = True

    def store_torchscript_models(self) -> list[str]:
        names, cursor = [], None
        while True:
            items, cursor = self.store.list_models(limit=1000, cursor=cursor)
            names += [item["name"] for item in items if self.store.torchscript_path(item["name"])]
            if cursor is None:
                return names

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the service is still loading its models and store")

    # -------------------------------------------------------------------------------------------- models

    def sync_uploaded_model(self, name: str) -> None:
        """Load (or reload) a TorchScript model uploaded to the store, when its file changed on disk."""
        if not self.store.model_exists(name):
            return
        path = self.store.torchscript_path(name)
        if path is None:
            return
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        loaded = self.registry.loaded(name)
        if loaded is not None and loaded.stamp == stamp:
            return
        metadata = self.store.get_model(name)
        try:
            model = self.registry.load_file(name, path, metadata)
            model.stamp = stamp
        except InvalidInput as exc:  # a bad file on the volume: serve the others, report this one
            logger.warning("uploaded model %s failed to load: %s", name, exc)

    def ensure_record(self, name: str, info: dict) -> None:
        """Give a shipped TorchScript model a record in the store, where its calibrators will live."""
        if not self.store.model_exists(name):
            keep = ("kind", "num_classes", "class_names", "input_shape", "description")
            self.store.put_model(name, {key: info[key] for key in keep if info.get(key) is not None})

    def model_info(self, name: str) -> dict:
        """Metadata of a model: TorchScript (shipped or uploaded) or logits-only; NotFound if neither."""
        info: dict[str, Any] | None = None
        if self.store.model_exists(name):
            info = dict(self.store.get_model(name))
            info.setdefault("kind", "logits")
        if name in self.registry.names():
            model = self.registry.get(name)
            info = {
                **(info or {}),
                "name": name,
                "kind": "torchscript",
                "num_classes": model.num_classes,
                "input_shape": list(model.input_shape) if model.input_shape else None,
                "class_names": model.class_names or (info or {}).get("class_names"),
                "description": model.description or (info or {}).get("description"),
                "device": str(model.device),
            }
        failing = self.registry.failing()
        if info is None:
            if name in failing:
                return {"name": name, "kind": "torchscript", "failing": failing[name]}
            raise NotFound(f"model {name!r} does not exist")
        if name in failing:
            info["failing"] = failing[name]
        info["name"] = name
        return info

    def all_model_names(self) -> list[str]:
        names: set[str] = set(self.registry.names()) | set(self.registry.failing())
        cursor = None
        while True:
            items, cursor = self.store.list_models(limit=1000, cursor=cursor)
            names.update(item["name"] for item in items)
            if cursor is None:
                return sorted(names)

    # --------------------------------------------------------------------------------------- calibrators

    def active(self, name: str) -> ActiveCalibrator:
        """The active calibrator of ``name``, reloaded only when the active pointer changed on disk."""
        try:
            stamp = self.store.active_stamp(name)
        except NotFound:  # a shipped model that has no record in the store yet
            stamp = None
        cached = self._active.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        version = self.store.active_version(name) if stamp else None
        if version is None:
            entry = ActiveCalibrator(version=None, calibrator=None, document=None, stamp=stamp)
        else:
            document = self.store.get_calibrator(name, version)
            entry = ActiveCalibrator(version, workflows.load_calibrator(document), document, stamp)
        with self._lock:
            self._active[name] = entry
        return entry

    def pinned(self, name: str, version: int) -> ActiveCalibrator:
        """A specific version (``?version=N``); versions are immutable, so they are cached for good."""
        key = (name, version)
        cached = self._pinned.get(key)
        if cached is not None:
            return cached
        document = self.store.get_calibrator(name, version)
        entry = ActiveCalibrator(version, workflows.load_calibrator(document), document)
        with self._lock:
            if len(self._pinned) > 1024:
                self._pinned.clear()
            self._pinned[key] = entry
        return entry

    def calibrator_for(self, name: str, version: int | None) -> ActiveCalibrator:
        return self.active(name) if version is None else self.pinned(name, version)

    def forget(self, name: str) -> None:
        with self._lock:
            self._active.pop(name, None)
            for key in [key for key in self._pinned if key[0] == name]:
                del self._pinned[key]
