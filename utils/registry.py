"""Name → class registries: one file defines one thing and registers it under its CLI name; and the scripts'
parser, which names the flag meant (or the component that declares it) when a flag is mistyped or misplaced."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Callable, Generic, TypeVar

from utils.errors import ConfigError
from utils.help import HelpFormatter

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


class CommandParser(argparse.ArgumentParser):
    """A script's parser whose mistakes end in one line on stderr, `error: ...`, with exit status 2.

    A flag it does not have is named with the nearest flag it has ("did you mean --buffer_size?"), or, when a
    component the command did not choose declares it, with that component and the flag that chooses it:
    `elsewhere()` maps such flags to that clause (computed only when a flag is unknown)."""

    def __init__(self, *args, elsewhere: Callable[[], dict[str, str]] | None = None, **options):
        options.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **options)
        self.elsewhere = elsewhere or dict

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        # Unknown flags first: a mistyped required flag is then named as mistyped, not as missing.
        options = args[:args.index("--")] if "--" in args else args  # after "--" every token is a value
        unknown = [token for token in options if token.startswith("--") and not self._knows(token.split("=")[0])]
        if unknown:
            self.error(self.unknown_sentence(unknown))
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # values no flag takes, e.g. `--download 1`
            self.error(f"unrecognized arguments: {' '.join(extras)}; no flag before them takes them (`python "
                       f"{self.prog} --help` shows what each flag takes)")
        return namespace

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")

    def _knows(self, flag: str) -> bool:
        if flag in self._option_string_actions:
            return True
        return self.allow_abbrev and any(o.startswith(flag) for o in self._option_string_actions)

    def unknown_sentence(self, flags: list[str]) -> str:
        """One sentence for the unknown flags: the component that declares the first one and how to choose it,
        else the nearest flag of this command for each."""
        import difflib

        elsewhere = self.elsewhere()
        flags = [flag.split("=")[0] for flag in flags]
        for flag in flags:
            if flag in elsewhere:
                return f"{flag} {elsewhere[flag]} or drop {flag}"
        own = [o for o in self._option_string_actions if o.startswith("--")]
        hints = []
        for flag in flags:
            near = difflib.get_close_matches(flag, own, n=1, cutoff=0.75)
            if near:
                hints.append(near[0] if len(flags) == 1 else f"{near[0]} for {flag}")
                continue
            near = difflib.get_close_matches(flag, list(elsewhere), n=1, cutoff=0.75)
            if near:
                return (f"unrecognized arguments: {flag}; the nearest flag, {near[0]}, {elsewhere[near[0]]}, or "
                        f"drop {flag}")
        named = " ".join(flags)
        if hints:
            return f"unrecognized arguments: {named}; did you mean {', '.join(hints)}?"
        return f"unrecognized arguments: {named}; `python {self.prog} --help` lists the flags"


def declared_elsewhere(kinds: list[tuple[str, str, str | None, list]]) -> dict[str, str]:
    """For the flags of components a command did not choose: flag → the clause saying which component declares
    it and how to choose it ("belongs to the backbone vit, not to the chosen backbone mlp; choose it with --backbone
    vit"). `kinds` holds (kind, choosing flag, chosen name or None, every component of the kind)."""
    clauses: dict[str, str] = {}
    for kind, choosing, chosen, components in kinds:
        owners: dict[str, list[str]] = {}
        for component in components:
            if component.NAME != chosen:
                for options in declared_flags(component).values():
                    for option in options:
                        owners.setdefault(option, []).append(component.NAME)
        for option, names in owners.items():
            which = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            choose = f"it with {choosing} {names[0]}" if len(names) == 1 else f"one of them with {choosing}"
            not_chosen = f"not to the chosen {kind} {chosen}" if chosen else f"and no {kind} is chosen"
            clauses.setdefault(option, f"belongs to the {kind} {which}, {not_chosen}; choose {choose}")
    return clauses


TRUE_WORDS, FALSE_WORDS = ("1", "true", "t", "y", "yes"), ("0", "false", "f", "n", "no")


def on_off(text: str) -> bool:
    """The value of an on/off flag given as Mammoth writes it (`--non_verbose 1`): 1/0, true/false, yes/no."""
    word = str(text).lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off; write 1 or 0 (or nothing, for on)")
    return word in TRUE_WORDS


def add_switch(group, *names: str, help: str) -> None:
    """An on/off flag that also takes Mammoth's explicit value: bare or 1 is on, 0 is off, absent is off."""
    group.add_argument(*names, nargs="?", const=True, default=False, type=on_off, metavar="0|1", help=help)
