"""Import a heavy module on first use, not at start-up.

torch costs a second and 200 MB per worker; a logits-only or proxy deployment never touches it. A module that
needs it names it with :func:`lazy_module` in place of ``import torch``; the first attribute read imports it
and rebinds the module's global to the real module, so every later use is a plain global lookup.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name`` in ``namespace`` (a module's ``globals()``) until first used."""

    __slots__ = ("_binding", "_name", "_namespace")

    def __init__(self, name: str, namespace: dict[str, Any], binding: str) -> None:
        self._name = name
        self._namespace = namespace
        self._binding = binding

    def load(self) -> ModuleType:
        module = importlib.import_module(self._name)
        self._namespace[self._binding] = module
        return module

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.load(), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str, namespace: dict[str, Any], binding: str | None = None) -> Any:
    """``torch = lazy_module("torch", globals())``: the module, imported when first used."""
    return LazyModule(name, namespace, binding or name.rpartition(".")[2])
