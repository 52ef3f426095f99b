"""What the command line needs to know about every registered component, without importing torch.

`--help`, an argument error and the parse itself need each component's name, aliases and flags
(and a dataset's default backbone, batch size and epochs), not the component. Reading them means
importing every family, which imports torch, timm and scipy: seconds before a single flag is read.
The catalogue records them once, keyed by a hash of the source files they come from, and keeps the
record under the user's cache folder as JSON (data only: reading it runs no code); while no source
changed, the parse reads the record instead (a few milliseconds). A changed file, a different
Python or a damaged record rebuilds it, so it can never disagree with the code.

Because flags are recorded, a component declares them as data: `type` is int, float or str,
defaults and choices are numbers, strings, booleans or lists of them. Anything else (a lambda as
`type`, say) is refused with one sentence naming the component and the flag. Value ranges are data
too: a component's `BOUNDS` maps a flag to an interval ("[0, 1]", "(0, inf)"), checked in one place
(continual/args.py).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils.cache import cache_dir, trusted
from utils.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
# kind of component → (package, name of its registry in the package's __init__)
FAMILIES = {
    "dataset": ("datasets", "DATASETS"),
    "backbone": ("backbones", "BACKBONES"),
    "model": ("models", "MODELS"),
    "buffer policy": ("buffer_policies", "BUFFER_POLICIES"),
    "plasticity method": ("plasticity", "PLASTICITY"),
}
# Plain class attributes the parse reads (a dataset's defaults, whether a model replays).
ATTRIBUTES = ("DEFAULT_BACKBONE", "DEFAULT_BATCH_SIZE", "DEFAULT_N_EPOCHS", "LONG_STREAM", "USES_BUFFER",
              "MEMORIZATION_VALUES", "NEEDS_MEMORIZATION_VALUES", "BOUNDS")
# Whatever a component's add_args may read: its family, the shared tools, and this file.
SOURCES = (*(package for package, _ in FAMILIES.values()), "utils", "continual/catalogue.py")
FORMAT = 2
TYPES = {"int": int, "float": float, "str": str}
_PLAIN = (type(None), bool, int, float, str)


@dataclass
class Component:
    """One registered component as the parser sees it."""

    name: str
    flags: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)  # add_argument(*names, **options)
    attributes: dict = field(default_factory=dict)

    @property
    def NAME(self) -> str:  # noqa: N802 (the registered classes' spelling)
        return self.name

    def add_args(self, group) -> None:
        """Declare this component's flags on an argument group, as its own add_args does."""
        for names, options in self.flags:
            if "type" in options:
                options = {**options, "type": TYPES[options["type"]]}
            if isinstance(options.get("choices"), list):
                options = {**options, "choices": tuple(options["choices"])}
            group.add_argument(*names, **options)

    def __getattr__(self, attribute: str):
        try:
            return self.__dict__["attributes"][attribute]
        except KeyError:
            raise AttributeError(attribute) from None


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value))


class _Recorder:
    """Stands in for an argument group: records each add_argument call, refusing options that are not data."""

    def __init__(self, owner: str):
        self.owner = owner
        self.calls: list[tuple[tuple[str, ...], dict]] = []

    def add_argument(self, *names, **options):
        flag = names[0] if names else "?"
        for key, value in options.items():
            if key == "type":
                if value not in TYPES.values():
                    raise ConfigError(f"{self.owner} declares {flag} with type={getattr(value, '__name__', value)}, "
                                      f"but flags are recorded as data; use type=int, float or str and check the "
                                      f"value in check_args or BOUNDS")
                options = {**options, "type": value.__name__}
            elif not _plain(value):
                raise ConfigError(f"{self.owner} declares {flag} with {key}={value!r}, which is not plain data; use "
                                  f"numbers, strings, booleans or lists of them")
        self.calls.append((names, options))


@dataclass
class Family:
    kind: str
    plural: str
    aliases: dict[str, str]  # every name a component answers to → its own name
    components: dict[str, Component]

    def names(self) -> list[str]:
        return sorted(self.aliases)

    def get(self, name: str) -> Component:
        """The component named (or aliased) `name`; the same sentence as the registry for an unknown one."""
        if name not in self.aliases:
            raise ConfigError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
        return self.components[self.aliases[name]]

    def classes(self) -> list[Component]:
        return [self.components[name] for name in sorted(self.components)]


def source_digest(root: Path = REPO_ROOT) -> str:
    """A hash of every file the catalogue is read from, and of the interpreter."""
    digest = hashlib.sha256(f"{FORMAT} {sys.version}".encode())
    for source in SOURCES:
        path = root / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def build() -> dict[str, Family]:
    """Import every family and record its components (what a stale or missing record costs)."""
    families = {}
    for kind, (package, registry_name) in FAMILIES.items():
        registry = getattr(importlib.import_module(package), registry_name)
        components = {}
        for cls in registry.classes():
            recorder = _Recorder(f"the {registry.kind} {cls.NAME}")
            cls.add_args(recorder)
            components[cls.NAME] = Component(cls.NAME, recorder.calls,
                                             {a: getattr(cls, a) for a in ATTRIBUTES if hasattr(cls, a)})
        aliases = {name: registry.get(name).NAME for name in registry.names()}
        families[kind] = Family(registry.kind, registry.plural, aliases, components)
    return families


_loaded: dict[str, Family] | None = None


def catalogue() -> dict[str, Family]:
    """Every family's components: from the record when it matches the sources, else built and recorded."""
    global _loaded
    if _loaded is not None:
        return _loaded
    # One record per checkout, holding the digest of the sources it was built from.
    path = cache_dir() / f"catalogue-{hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:16]}.json"
    digest = source_digest()
    try:
        record = json.loads(path.read_text()) if trusted(path) else {}
        if record["digest"] == digest:
            _loaded = _from_json(record["families"])
            return _loaded
    except Exception:  # absent, damaged, or written by other code: rebuild
        pass
    _loaded = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"digest": digest, "families": _to_json(_loaded)}))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except OSError:  # an unwritable cache only costs the next start the same build
        pass
    return _loaded


def _to_json(families: dict[str, Family]) -> dict:
    return {kind: {"kind": f.kind, "plural": f.plural, "aliases": f.aliases,
                   "components": {name: {"flags": [[list(names), options] for names, options in c.flags],
                                         "attributes": c.attributes} for name, c in f.components.items()}}
            for kind, f in families.items()}


def _from_json(record: dict) -> dict[str, Family]:
    return {kind: Family(f["kind"], f["plural"], f["aliases"],
                         {name: Component(name, [(tuple(names), options) for names, options in c["flags"]],
                                          c["attributes"]) for name, c in f["components"].items()})
            for kind, f in record.items()}


def family(kind: str) -> Family:
    return catalogue()[kind]
