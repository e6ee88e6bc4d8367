"""Make ``AutoConfig`` / ``AutoModelForCausalLM`` know leantrain's model without importing transformers early.

``import leantrain`` must stay light, and importing transformers with torch takes seconds. So instead of
registering eagerly, ``install_transformers_hook`` puts a finder on ``sys.meta_path`` that waits for
``transformers`` to be imported, lets it execute, then imports ``leantrain.nn.hf`` (whose import registers
``LeanConfig`` and ``LeanForCausalLM``). If transformers is already imported, that happens at once.

This module imports neither torch nor transformers.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from types import ModuleType

TARGET = "transformers"
REGISTERING_MODULE = "leantrain.nn.hf"


def _register_now() -> None:
    """Import the module whose import registers the auto classes; a failure warns, never breaks transformers."""
    try:
        importlib.import_module(REGISTERING_MODULE)
    except Exception as error:  # a broken registration must not make `import transformers` fail
        warnings.warn(f"leantrain: could not register its model with transformers: {error!r}", stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader, then the registration; the module keeps the real loader as its ``__loader__``."""

    def __init__(self, loader: importlib.abc.Loader, finder: "TransformersImportHook"):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.remove()
        _register_now()


class TransformersImportHook(importlib.abc.MetaPathFinder):
    """A one-shot post-import hook for the top-level ``transformers`` package."""

    def __init__(self) -> None:
        self._searching = threading.local()

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:  # ask the other finders where transformers is; this finder declines while they answer
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisterAfterExec(spec.loader, self)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install_transformers_hook() -> None:
    """Register leantrain's model with transformers when transformers gets imported (now, if it already is).

    Idempotent: a second call installs nothing.
    """
    if TARGET in sys.modules:
        _register_now()
        return
    if not any(isinstance(finder, TransformersImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, TransformersImportHook())
