"""Lazy package exports (PEP 562): a package names what it exports and from which submodule, and the submodule
is imported on first use.

Why: ``from metaformer.heads import MAML`` used to import every head, every data source and the
``transformers`` encoder wrapper; a process that trains one MAML head paid ~3 MiB of resident memory and the
import time for modules it never ran (measured in the sinusoid benchmark, where the whole step is ~10 MiB).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(
    package: str, exports: dict[str, list[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``exports`` = {submodule: [names]}."""
    where = {name: sub for sub, names in exports.items() for name in names}
    if len(where) != sum(len(names) for names in exports.values()):
        raise ValueError(f"{package}: a name is exported by two submodules")

    def __getattr__(name: str) -> Any:
        """Import the submodule that defines ``name`` (or the submodule ``name`` itself) on first access."""
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        sub = where.get(name)
        if sub is None:
            # Submodules stay reachable as attributes (``metaformer.data.omniglot``) as with eager imports.
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        """The package's attributes plus every lazy export."""
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
