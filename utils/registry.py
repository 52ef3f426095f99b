"""Name → class registries: one file defines one thing and registers it under its CLI name."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from utils.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps CLI names to classes of one kind (datasets, backbones, models, buffer policies)."""

    def __init__(self, kind: str, package: str, plural: str | None = None):
        self.kind = kind
        self.plural = plural or kind + "s"
        self.package = package
        self._entries: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise RuntimeError(f"two {self.kind}s are registered as {name!r}")
            self._entries[name] = cls
            cls.NAME = name
            return cls

        return decorator

    def _load(self) -> None:
        # Importing every module of the package runs its @register decorators.
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        self._load()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}"
            )
        return self._entries[name]
