"""What one worker holds: the store, the model registry, the dynamic batcher, and caches of each model's
:class:`ModelInfo` and active calibrator for the hot path.

Workers share the store. The caches key what they hold by the store's change stamp of the model
(:meth:`CalibratorStore.change_stamp`) and by the registry's model object, so a fit or activation made by
any worker (or replica) is served by all from the next request on, for the price of a ``stat`` or two.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import workflows
from service.config import Settings
from service.errors import InvalidInput, MissingDependency, NotFound, NotReady, StoreUnavailable
from service.registry import LoadedModel, ModelRegistry
from service.serving.batching import DynamicBatcher
from service.stores import Store
from service.upstream import Upstreams, UpstreamSpec

logger = logging.getLogger("calibserve.state")

# The metadata a model record keeps in the store; everything else a model has is known at run time.
RECORD_KEYS = ("kind", "num_classes", "class_names", "input_shape", "description", "upstream")
CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model as every protocol sees it: logits-only (a store record), TorchScript (shipped in the
    models directory or uploaded to the store) or served by an upstream inference server (``upstream``:
    declared in a record or a ``model.json`` of the models directory, or any name unknown here when the
    server has a default upstream), with the reason it fails where it does."""

    name: str
    kind: str = "logits"
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    description: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    device: str | None = None
    failing: str | None = None
    upstream: UpstreamSpec | None = None
    # A name unknown here that the default upstream serves (transparent mode): its inference answers pass
    # through unchanged until it has an active calibrator (its first fit gives it a record).
    transparent: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, name: str, record: Mapping[str, Any]) -> ModelInfo:
        """A model from its store record (``model.json``); keys it does not know are kept in ``extra``."""
        names, shape = record.get("class_names"), record.get("input_shape")
        upstream = record.get("upstream")
        return cls(
            name=name,
            kind="upstream" if upstream is not None else record.get("kind", "logits"),
            upstream=UpstreamSpec.from_record(upstream, default_model=name) if upstream is not None else None,
            num_classes=record.get("num_classes"),
            class_names=tuple(names) if names else None,
            description=record.get("description"),
            input_shape=tuple(shape) if shape else None,
            extra={key: value for key, value in record.items() if key not in (*RECORD_KEYS, "name")},
        )

    @property
    def task(self) -> str:
        """``multilabel`` (K independent sigmoid outputs) where the record declares it, else ``multiclass``."""
        return "multilabel" if self.extra.get("task") == "multilabel" else "multiclass"

    def with_loaded(self, model: LoadedModel) -> ModelInfo:
        """This model as the registry loaded it (TorchScript)."""
        return ModelInfo(
            name=self.name,
            kind="torchscript",
            num_classes=model.num_classes,
            class_names=model.class_names or self.class_names,
            description=model.description or self.description,
            input_shape=model.input_shape or None,
            input_dtype=model.input_dtype,
            device=str(model.device),
            failing=self.failing,
            extra={**self.extra, "task": model.task} if model.task else self.extra,
        )

    @classmethod
    def on_default_upstream(cls, name: str) -> ModelInfo:
        """A model unknown here, served by the default upstream under its own name."""
        return cls(name=name, kind="upstream", upstream=UpstreamSpec(url=None, model=name), transparent=True)

    def record(self) -> dict[str, Any]:
        """What the store keeps of this model."""
        values = {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names else None,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "description": self.description,
            "upstream": self.upstream.to_record() if self.upstream is not None else None,
            # kept where declared (a shipped model's model.json), so the record a first fit writes keeps it
            "task": self.extra.get("task"),
        }
        return {key: value for key, value in values.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form answered by the v1 API."""
        body: dict[str, Any] = {**self.extra, "name": self.name, **self.record()}
        body.setdefault("class_names", None)
        body.setdefault("description", None)
        if self.kind == "torchscript":
            body.setdefault("input_shape", None)
            body["device"] = self.device
        if self.failing is not None:
            body["failing"] = self.failing
        return body


@dataclass(frozen=True, slots=True)
class ActiveCalibrator:
    """A loaded calibrator with its document; ``version`` None means no calibrator (plain softmax)."""

    version: int | None
    calibrator: Any
    document: dict | None
    # the version's conformal thresholds (workflows.load_conformal) when it was fitted with prediction sets
    conformal: Any = None


NO_CALIBRATOR = ActiveCalibrator(version=None, calibrator=None, document=None)


@dataclass
class AppState:
    settings: Settings
    store: Store
    registry: ModelRegistry
    ready: bool = False
    batcher: DynamicBatcher | None = None
    upstreams: Upstreams = field(default_factory=lambda: Upstreams(None))
    _views: dict[str, tuple[Any, LoadedModel | None, ModelInfo, ActiveCalibrator]] = field(
        default_factory=dict
    )
    _pinned: dict[tuple[str, int], ActiveCalibrator] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Uploaded models not loaded yet (start-up loads them in the background), and the file stamp of each
    # uploaded model whose file failed to load (not tried again until the file changes).
    _pending: set[str] = field(default_factory=set)
    _failed_stamps: dict[str, int] = field(default_factory=dict)
    _loader: threading.Thread | None = None
    # Upstream models declared by a model.json of the models directory (no model.pt): name -> model.
    _shipped_upstream: dict[str, ModelInfo] = field(default_factory=dict)
    # One load at a time: concurrent requests for a changed file load it once, not once each (a load
    # runs the file's smoke check, and a stalling one holds a thread per try).
    _load_lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Load the shipped models (trusted, part of the image), then serve: uploaded models load in a
        background thread, so that one that is slow or stalls (its smoke check is time-limited) delays
        only itself. Until loaded, a model is listed by :meth:`pending` and needing it answers NotReady."""
        self.store.cleanup_temp_files()
        self.registry.load_all()
        self._shipped_upstream = self._read_shipped_upstream()
        try:
            names = self.store_torchscript_models()
        except StoreUnavailable as exc:
            # Not fatal: /readyz says why, writes answer 503, and uploaded models load on first use once the
            # store answers (an S3 bucket missing or unreachable at start-up).
            logger.error("the calibrator store cannot be listed at start-up: %s", exc)
            names = []
        with self._lock:
            self._pending = set(names)
        if names:
            self._loader = threading.Thread(
                target=self._load_stored, args=(names,), name="calibserve-load-models", daemon=True
            )
            self._loader.start()
        self.ready = True

    def _load_stored(self, names: list[str]) -> None:
        for name in names:
            try:
                with self._load_lock:
                    change = self._file_change(name)
                    if change is not None:
                        self._load_uploaded(name, *change)
            except Exception:  # never let one model stop the others from loading
                logger.exception("uploaded model %s could not be loaded", name)
            finally:
                with self._lock:
                    self._pending.discard(name)
        logger.info("uploaded models loaded: %d", len(names))

    def _read_shipped_upstream(self) -> dict[str, ModelInfo]:
        """Models of the models directory with a ``model.json`` naming an ``upstream`` and no ``model.pt``."""
        declared: dict[str, ModelInfo] = {}
        for name, record in self.registry.declared_without_file().items():
            if "upstream" not in record:
                continue
            try:
                declared[name] = ModelInfo.from_record(name, record)
            except InvalidInput as exc:
                logger.warning("skipping upstream model %s of the models directory: %s", name, exc)
        return declared

    def pending(self) -> list[str]:
        """Uploaded models still loading in the background since start-up."""
        with self._lock:
            return sorted(self._pending)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for the background loading of uploaded models; True when it is over."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
            return not loader.is_alive()
        return True

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
        """Load (or reload) a TorchScript model uploaded to the store, when its file changed on disk (e.g.
        uploaded through another worker); NotReady while start-up is still loading it in the background.

        A load runs the file's smoke check: async callers check :meth:`uploaded_model_changed` (a
        ``stat``) first, and load in a thread only then."""
        if self._uploaded_change(name) is None:
            return
        with self._load_lock:
            change = self._file_change(name)  # another request may have loaded it meanwhile
            if change is not None:
                self._load_uploaded(name, *change)

    def uploaded_model_changed(self, name: str) -> bool:
        """True when :meth:`sync_uploaded_model` has a file to load; NotReady while it is pending."""
        return self._uploaded_change(name) is not None

    def _uploaded_change(self, name: str) -> tuple[Path, int] | None:
        if self._pending and name in self._pending:
            raise NotReady(f"model {name!r} is still loading; retry shortly")
        return self._file_change(name)

    def _file_change(self, name: str) -> tuple[Path, int] | None:
        """The uploaded file of ``name`` and its stamp, when it is neither loaded nor known to fail."""
        if not self.store.model_exists(name):
            return None
        path = self.store.torchscript_path(name)
        if path is None:
            return None
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        loaded = self.registry.loaded(name)
        if loaded is not None and loaded.stamp == stamp:
            return None
        if self._failed_stamps.get(name) == stamp:  # failed already: a stalled check is not run again
            return None
        return path, stamp

    def _load_uploaded(self, name: str, path: Path, stamp: int) -> None:
        try:
            metadata = self.store.get_model(name)
            model = self.registry.check_bytes(name, path.read_bytes(), metadata, source=path)
        except (InvalidInput, NotFound, OSError, MissingDependency) as exc:  # a bad file: serve the others
            with self._lock:
                self._failed_stamps[name] = stamp
            self.registry.record_load_failure(name, exc)
            return
        model.stamp = stamp
        self.registry.install(model)
        with self._lock:
            self._failed_stamps.pop(name, None)

    def install_uploaded(self, model: LoadedModel) -> None:
        """Serve a model the upload checked (:meth:`ModelRegistry.check_bytes`) once its file is in the
        store, stamped with that file, so that it is not loaded (and smoke-checked) a second time."""
        path = self.store.torchscript_path(model.name)
        if path is None:
            return
        try:
            model.stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        model.source = path
        self.registry.install(model)
        with self._lock:
            self._failed_stamps.pop(model.name, None)

    def is_shipped(self, name: str, loaded: LoadedModel | None = None) -> bool:
        """Whether ``name`` is a TorchScript model of the models directory (trusted, not in the store)."""
        loaded = loaded if loaded is not None else self.registry.loaded(name)
        if loaded is None:
            if name in self._shipped_upstream:
                return True
            return name in self.registry.failing() and not self.store.model_exists(name)
        return loaded.source is None or not loaded.source.resolve().is_relative_to(self.store.root.resolve())

    def ensure_record(self, info: ModelInfo, num_classes: int | None = None) -> None:
        """Give a shipped model (or one the default upstream serves) a record in the store, where its
        calibrators will live; ``num_classes`` (of the calibrator being stored) where the model has none.

        Only those: a model whose record is gone was deleted (perhaps while a fit ran), and a fit must not
        bring it back (a model of the default upstream exists whatever the store holds).
        """
        if (self.is_shipped(info.name) or info.transparent) and not self.store.model_exists(info.name):
            record = info.record()
            if info.num_classes is None and num_classes is not None:
                record["num_classes"] = num_classes
            self.store.put_model(info.name, record)

    def lookup(self, name: str, version: int | None = None) -> tuple[ModelInfo, ActiveCalibrator]:
        """The model ``name`` and its active calibrator, or version ``version`` (NotFound if missing).

        Cached per worker by the store's change stamp of the model and by the registry's model object, so a
        request costs two ``stat`` s, and a change made by any worker or replica is served from the next
        request on. The stamp is taken before anything is read: a change in between costs one extra reload,
        never a stale cache.
        """
        stamp = self.store.change_stamp(name)
        loaded = self.registry.loaded(name)
        cached = self._views.get(name)
        if cached is None or cached[0] != stamp or cached[1] is not loaded:
            info = self._read_model_info(name, loaded, has_record=stamp[0] is not None)
            active = self._read_active(name) if stamp[1] is not None else NO_CALIBRATOR
            cached = (stamp, loaded, info, active)
            with self._lock:
                if len(self._views) > CACHE_LIMIT:
                    self._views.clear()
                self._views[name] = cached
        return cached[2], (cached[3] if version is None else self.pinned(name, version))

    def lookup_blocks(self, name: str, version: int | None = None) -> bool:
        """Whether :meth:`lookup` would wait for a remote store (a model not in the S3 store's cached view,
        or a pinned version read for the first time): async callers then run it in a thread."""
        if not self.store.serves_from_memory(name):
            return True
        return self.store.remote and version is not None and (name, version) not in self._pinned

    def model_info(self, name: str) -> ModelInfo:
        """The model ``name``; NotFound if it exists neither in the store nor in the registry."""
        return self.lookup(name)[0]

    def _read_model_info(self, name: str, loaded: LoadedModel | None, *, has_record: bool) -> ModelInfo:
        if loaded is not None and not has_record and not self.is_shipped(name, loaded):
            # An uploaded model whose record another worker (or replica) deleted: forget it here too.
            with contextlib.suppress(NotFound):
                self.registry.remove(name)
            loaded = None
        failing = self.registry.failing().get(name)
        info = None
        if has_record:
            try:
                info = ModelInfo.from_record(name, self.store.get_model(name))
            except NotFound:  # deleted since the stamp was taken
                info = None
        if loaded is not None:
            info = (info or ModelInfo(name)).with_loaded(loaded)
        if info is None:
            if failing is not None:
                return ModelInfo(name, kind="torchscript", failing=failing)
            shipped = self._shipped_upstream.get(name)
            if shipped is not None:
                return shipped
            if self.settings.upstream is not None:
                return ModelInfo.on_default_upstream(name)
            raise NotFound(f"model {name!r} does not exist")
        if failing is not None:
            info = ModelInfo(**{**_fields(info), "failing": failing})
        return info

    def all_model_names(self) -> list[str]:
        names: set[str] = (
            set(self.registry.names()) | set(self.registry.failing()) | set(self._shipped_upstream)
        )
        cursor = None
        while True:
            items, cursor = self.store.list_models(limit=1000, cursor=cursor)
            names.update(item["name"] for item in items)
            if cursor is None:
                return sorted(names)

    # --------------------------------------------------------------------------------------- calibrators

    def active(self, name: str) -> ActiveCalibrator:
        """The active calibrator of ``name`` (no calibrator for a shipped model without a store record)."""
        try:
            return self.lookup(name)[1]
        except NotFound:
            if name in self.registry:
                return NO_CALIBRATOR
            raise

    def _read_active(self, name: str) -> ActiveCalibrator:
        # The store's read retries when another worker activates a new version and deletes the old one
        # between reading the pointer and reading the version.
        try:
            document = self.store.active_calibrator(name)
        except NotFound:  # the model was deleted since the stamp was taken
            return NO_CALIBRATOR
        if document is None:
            return NO_CALIBRATOR
        return ActiveCalibrator(
            document["version"],
            workflows.load_calibrator(document),
            document,
            workflows.load_conformal(document),
        )

    def pinned(self, name: str, version: int) -> ActiveCalibrator:
        """A specific version (``?version=N``); versions are immutable, so they are cached for good."""
        key = (name, version)
        cached = self._pinned.get(key)
        if cached is not None:
            return cached
        document = self.store.get_calibrator(name, version)
        entry = ActiveCalibrator(
            version, workflows.load_calibrator(document), document, workflows.load_conformal(document)
        )
        with self._lock:
            if len(self._pinned) > 1024:
                self._pinned.clear()
            self._pinned[key] = entry
        return entry

    def calibrator_for(self, name: str, version: int | None) -> ActiveCalibrator:
        return self.active(name) if version is None else self.pinned(name, version)

    def forget(self, name: str) -> None:
        with self._lock:
            self._views.pop(name, None)
            for key in [key for key in self._pinned if key[0] == name]:
                del self._pinned[key]


def _fields(info: ModelInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in ModelInfo.__slots__}
