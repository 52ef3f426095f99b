"""Name → class registries: one file defines one thing and registers it under its CLI name."""
from __future__ import annotations

import argparse
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

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
        """Register a class under `name` (its file's name); `aliases` are other names it answers to."""
        def decorator(cls: type[T]) -> type[T]:
            for key in (name, *aliases):
                if key in self._entries and self._entries[key] is not cls:
                    raise RuntimeError(f"two {self.kind}s are registered as {key!r}")
                self._entries[key] = cls
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
        """Every name a class answers to (file names and aliases)."""
        self._load()
        return sorted(self._entries)

    def classes(self) -> list[type[T]]:
        """Each registered class once, in the order of its name."""
        self._load()
        return sorted(set(self._entries.values()), key=lambda cls: cls.NAME)

    def get(self, name: str) -> type[T]:
        self._load()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}"
            )
        return self._entries[name]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """Each flag of a parser: its destination → its option strings (`l2_lambda` → ('--l2_lambda',))."""
    return {action.dest: tuple(action.option_strings) for action in parser._actions}


def declared_flags(component: type) -> dict[str, tuple[str, ...]]:
    """The flags a registered component declares in its `add_args`, as `flags_of` gives them."""
    parser = argparse.ArgumentParser(add_help=False)
    component.add_args(parser)
    return flags_of(parser)


def method_names(text: str | None) -> list[str]:
    """`--plasticity` as a list of names ('' and 'none' mean no method)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--plasticity lists a method twice ({text!r}); name each method once")
    return names


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """'[0, 1]', '(0, inf)', '[1, inf)' → (low, high, low closed, high closed)."""
    text = text.strip()
    if len(text) < 5 or text[0] not in "[(" or text[-1] not in "])" or "," not in text:
        raise ValueError(f"bounds {text!r} are not an interval such as '[0, 1]' or '(0, inf)'")
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def check_bounds(args: argparse.Namespace, bounds: dict[str, str], owner: str | None = None) -> None:
    """Refuse, with one sentence, a flag value outside the interval its component declares in BOUNDS."""
    for dest, interval in (bounds or {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        low, high, low_closed, high_closed = parse_interval(interval)
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (above and below):  # NaN fails both
            whose = f" (declared by {owner})" if owner else ""
            raise ConfigError(f"--{dest} must be in {interval}{whose}, got {value}; pass a value in that range")
