"""Import a heavy module on first use, not at start-up.

torch costs a second and 200 MB per worker; a logits-only or proxy deployment never touches it. A module that
needs it names it with :func:`lazy_module` in place of ``import torch``; the first attribute read imports it
and rebinds the module's global to the real module, so every later use is a plain global lookup.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from service.errors import MissingDependency


class LazyModule:
    """Stands for module ``name`` in ``namespace`` (a module's ``globals()``) until first used."""

    __slots__ = ("_binding", "_name", "_namespace", "_needed_for")

    def __init__(self, name: str, namespace: dict[str, Any], binding: str, needed_for: str) -> None:
        self._name = name
        self._namespace = namespace
        self._binding = binding
        self._needed_for = needed_for

    def load(self) -> ModuleType:
        module = require_module(self._name, needed_for=self._needed_for)
        self._namespace[self._binding] = module
        return module

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.load(), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str, namespace: dict[str, Any], *, needed_for: str, binding: str | None = None) -> Any:
    """``torch = lazy_module("torch", globals(), needed_for="TorchScript models")``: the module, imported when
    first used; MissingDependency (naming ``needed_for``) where it is not installed."""
    return LazyModule(name, namespace, binding or name.rpartition(".")[2], needed_for)


def require_module(name: str, *, needed_for: str) -> ModuleType:
    """Module ``name``, imported; MissingDependency naming ``needed_for`` where it is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise MissingDependency(
            f"{needed_for} needs {name}, which this installation lacks (an image built with WITH_TORCH=0?): "
            f"install {name}"
        ) from None
