"""The method registry: `register(name)` adds a detector class, `get(name, **overrides)` builds one.

Third-party packages add methods through the entry-point group `ndbench.methods`; each entry
point names a detector class (or a module that registers its classes on import).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points

from datasets_builders.errors import NdbenchError

ENTRY_POINT_GROUP = "ndbench.methods"
# Built-in method modules, imported on first use so `import methods.registry` stays cheap.
BUILTIN_MODULES = (
    "methods.knn",
    "methods.defend",
    "methods.transformaly",
    "methods.kdad",
    "methods.msad",
    "methods.rdad",
    "methods.dsvdd",
)


@dataclass
class Registry:
    """Name -> detector class. One default instance (`REGISTRY`) serves the package."""

    classes: dict[str, type] = field(default_factory=dict)
    loaded: bool = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register a detector class under `name`."""

        def decorate(cls: type) -> type:
            existing = self.classes.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"method name {name!r} is already registered by {existing!r}")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def load(self) -> None:
        """Import the built-in methods and the `ndbench.methods` entry points (once)."""
        if self.loaded:
            return
        self.loaded = True
        for module in BUILTIN_MODULES:
            import_module(module)
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            target = entry.load()
            if isinstance(target, type) and entry.name not in self.classes:
                self.register(entry.name)(target)

    def available(self) -> list[str]:
        """Registered method names, sorted."""
        self.load()
        return sorted(self.classes)

    def get_class(self, name: str) -> type:
        """The class registered under `name`; one clear error for an unknown name."""
        self.load()
        try:
            return self.classes[name]
        except KeyError:
            raise NdbenchError(
                f"unknown method {name!r}", f"use one of {', '.join(self.available())}"
            ) from None

    def get(self, name: str, **overrides):
        """Build the detector `name` with its paper defaults, changed by `overrides`."""
        return self.get_class(name)(**overrides)


REGISTRY = Registry()
register = REGISTRY.register
available = REGISTRY.available
get = REGISTRY.get
get_class = REGISTRY.get_class
