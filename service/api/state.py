"""What one worker holds: the store, the model registry, the dynamic batcher, and caches of the active
calibrators and of each model's view for the hot path (:class:`ModelViews`).

Workers share the store on disk. The caches key what they hold by ``stat`` stamps of the store's files, so a
fit or activation made by any worker (or replica) is served by all from the next request on, for the price
of a ``stat`` or two per request.
"""

from __future__ import annotations

import logging
import os
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


@dataclass(frozen=True)
class ModelView:
    """What the hot path needs to know of a model."""

    name: str
    kind: str
    num_classes: int | None
    class_names: tuple[str, ...] | None


def _stamp(path: str) -> tuple[int, ...] | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (info.st_mtime_ns, info.st_ino, info.st_size)


class ModelViews:
    """Per-worker cache of each model's :class:`ModelView` and active calibrator, keyed by stat stamps.

    ``AppState.model_info`` reads ``model.json`` on every call. Here a request costs two ``stat`` s (of
    ``model.json`` and of the ``active`` pointer, on plain string paths) and a registry lookup: every store
    write replaces the file it changes (a new inode; the pointer's mtime also moves strictly forward), and
    an upload replaces the registry's model object, so a change made by any worker or replica is served
    from the next request on. On a change the state's own loaders run, so this cache never holds anything
    older than what it stat-ed. (The pointer's stamp is exact; a ``model.json`` rewritten twice within one
    clock tick, reusing its inode number and size, could keep an older view of the metadata until the next
    change: the store guarantees strictly increasing mtimes for the pointer only.)
    """

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._entries: dict[str, tuple[tuple[Any, ...], Any, ModelView, ActiveCalibrator]] = {}
        self._paths: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def _files(self, name: str) -> tuple[str, str]:
        # <store>/<model>/model.json and <store>/<model>/active: the documented store layout (DESIGN.md).
        paths = self._paths.get(name)
        if paths is None:
            directory = os.path.join(self.state.store.root, name)
            paths = (os.path.join(directory, "model.json"), os.path.join(directory, "active"))
            if len(self._paths) > 4096:
                self._paths.clear()
            self._paths[name] = paths
        return paths

    def _entry(self, name: str) -> tuple[ModelView, ActiveCalibrator]:
        model_file, pointer_file = self._files(name)
        stamps = (_stamp(model_file), _stamp(pointer_file))
        loaded = self.state.registry.loaded(name)
        cached = self._entries.get(name)
        if cached is not None and cached[0] == stamps and cached[1] is loaded:
            return cached[2], cached[3]
        info = self.state.model_info(name)
        names = info.get("class_names")
        view = ModelView(
            name=name,
            kind=info.get("kind", "logits"),
            num_classes=info.get("num_classes"),
            class_names=tuple(names) if names else None,
        )
        active = self.state.active(name)
        with self._lock:
            if len(self._entries) > 4096:
                self._entries.clear()
            self._entries[name] = (stamps, loaded, view, active)
        return view, active

    def get(self, name: str) -> ModelView:
        """The model's view; NotFound (404) for a model that does not exist."""
        return self._entry(name)[0]

    def lookup(self, name: str, version: int | None) -> tuple[ModelView, ActiveCalibrator]:
        """The model's view and its active calibrator, or version ``version`` (NotFound if missing)."""
        view, active = self._entry(name)
        return view, (active if version is None else self.state.pinned(name, version))


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
    views: ModelViews = field(init=False)

    def __post_init__(self) -> None:
        self.views = ModelViews(self)

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
