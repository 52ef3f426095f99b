"""Sweep files: a base configuration, a grid per method, seeds, and the metric that selects.

    name: random-label-digits          # optional; default: the file's name
    base: {dataset: random-label-digits, model: sgd, optimizer: adam, lr: 1.0e-3}   # any main.py flags
    methods:
      vanilla: {}                      # the base configuration as it is
      l2init:
        flags: {plasticity: l2init}    # fixed flags of the method
        grid: {l2init_lambda: [1.0e-3, 1.0e-4]}   # every combination of these values is searched
      snr_v2_l2:
        flags: {plasticity: "snr_v2,l2"}
        reuse: [snr_v2, l2]            # starts from the configurations chosen for these methods
    selection: {metric: terminal_test_acc_last_5, mode: max}
    search_seeds: [0, 1]
    final_seeds: [10, 11, 12]

A cell is one main.py run: a method's configuration with one seed. Its key hashes the flags the
file gives it and the seed, so a finished cell is not run again as long as the file still holds it,
whatever else in the file changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from continual.args import full_parser, parse_args
from continual.evaluation import logged_summary_metrics
from datasets import DATASETS
from utils.errors import ConfigError
from utils.registry import flags_of

TOP_LEVEL = {"name", "base", "methods", "selection", "search_seeds", "final_seeds"}
METHOD_KEYS = {"flags", "grid", "reuse"}
# The sweep sets these itself: seeds from the file, where and how runs are logged from the command line.
SWEEP_FLAGS = {"seed", "tracking_uri", "experiment_name", "run_name", "resume", "savecheck", "checkpoint_dir"}
PATH_FLAGS = ("config", "data_path", "mem_scores")  # made absolute for workers that start elsewhere


def cell_key(flags: dict, seed: int) -> str:
    text = json.dumps({"flags": flags, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flags_to_argv(flags: dict) -> list[str]:
    """main.py's command line for a flag mapping: True is a bare switch, False and None are left out."""
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not False and value is not None:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            argv += [f"--{name}", text]
    return argv


@dataclass(frozen=True)
class Cell:
    """One main.py run of a sweep: a method's configuration with one seed."""

    method: str
    config: dict  # the hyperparameters that distinguish this configuration (grid point and reused values)
    flags: dict  # every flag the sweep file gives the run, except the seed
    seed: int

    @property
    def key(self) -> str:
        return cell_key(self.flags, self.seed)

    @property
    def run_name(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.method} {shown} seed {self.seed}".replace("  ", " ")

    def argv(self) -> list[str]:
        flags = dict(self.flags)
        flags.setdefault("data_path", "./data")
        for name in PATH_FLAGS:
            if isinstance(flags.get(name), str):
                flags[name] = str(Path(flags[name]).expanduser().resolve())
        return flags_to_argv({**flags, "seed": self.seed})


@dataclass
class Method:
    name: str
    flags: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    reuse: list = field(default_factory=list)

    def configurations(self, chosen: dict[str, dict]) -> list[dict]:
        """Every grid point, on top of the configurations chosen for the methods it reuses."""
        start = {}
        for name in self.reuse:
            start.update(chosen[name])
        names = list(self.grid)
        return [{**start, **dict(zip(names, values))} for values in itertools.product(*self.grid.values())]


@dataclass
class Sweep:
    path: Path
    name: str
    base: dict
    methods: dict[str, Method]
    metric: str
    mode: str
    search_seeds: list[int]
    final_seeds: list[int]
    text: str  # the file as given, logged with the parent run

    @property
    def fingerprint(self) -> str:
        """Changes when anything that decides which cells run changes (not comments or layout)."""
        content = {"base": self.base, "methods": {k: vars(m) for k, m in self.methods.items()},
                   "metric": self.metric, "mode": self.mode, "search": self.search_seeds, "final": self.final_seeds}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stages(self) -> list[list[str]]:
        """Methods in the order they can be searched: a method that reuses others comes after them."""
        done: list[str] = []
        stages = []
        while len(done) < len(self.methods):
            stage = [n for n, m in self.methods.items() if n not in done and all(r in done for r in m.reuse)]
            stages.append(stage)
            done += stage
        return stages

    def cells(self, method: str, config: dict, seeds: list[int]) -> list[Cell]:
        flags = {**self.base, **self.methods[method].flags, **config}
        return [Cell(method, config, flags, seed) for seed in seeds]

    def search_cells(self, method: str, chosen: dict[str, dict]) -> list[Cell]:
        return [cell for config in self.methods[method].configurations(chosen)
                for cell in self.cells(method, config, self.search_seeds)]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem ends here with one sentence, before anything runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist; pass the path of a YAML file such as "
                          f"sweeps/random_label_digits.yaml") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"sweep file {path} cannot be read as text ({type(error).__name__}); pass a YAML file") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {path} is not valid YAML ({str(error).splitlines()[0]}); fix the file") from None
    where = f"sweep file {path}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(sorted(TOP_LEVEL))}")
    unknown = sorted(map(str, set(spec) - TOP_LEVEL))  # YAML keys may be numbers or null
    if unknown:
        raise ConfigError(f"{where} has unknown keys {', '.join(unknown)}; the keys are {', '.join(sorted(TOP_LEVEL))}")
    missing = sorted(k for k in TOP_LEVEL - {"name"} if k not in spec)
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; add them (see sweeps/README.md)")

    base = _mapping(spec["base"], f"{where}: base")
    methods = _methods(spec["methods"], where)
    selection = spec["selection"]
    if isinstance(selection, str):
        selection = {"metric": selection}
    selection = _mapping(selection, f"{where}: selection")
    if "metric" not in selection or set(selection) - {"metric", "mode"}:
        raise ConfigError(f"{where}: selection must be {{metric: NAME, mode: max|min}}, got {selection}")
    mode = selection.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{where}: selection mode must be max or min, got {mode!r}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name) or ".." in name:
        raise ConfigError(f"{where}: name {name!r} becomes a folder and an MLflow experiment, so it may hold only "
                          f"letters, digits, '_', '-' and '.' (no '..', no '/'); rename it")
    sweep = Sweep(path, name, base, methods, str(selection["metric"]), mode,
                  _seeds(spec["search_seeds"], f"{where}: search_seeds"),
                  _seeds(spec["final_seeds"], f"{where}: final_seeds"), text)
    for name, method in methods.items():
        controlled = sorted(SWEEP_FLAGS & (set(base) | set(method.flags) | set(method.grid)))
        if controlled:
            raise ConfigError(f"{where} sets {', '.join(controlled)}, which the sweep sets itself (seeds from "
                              f"search_seeds and final_seeds, logging from the command line); remove them")
    _check_runs(sweep)
    return sweep


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of flag: value, got {type(value).__name__}")
    return value


def _seeds(value, where: str) -> list[int]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where} must be a non-empty list of integer seeds, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where} lists a seed twice ({value}); list each seed once")
    return seeds


def _methods(value, where: str) -> dict[str, Method]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: methods must be a non-empty mapping of method name: {{flags, grid, reuse}}")
    methods = {}
    for name, entry in value.items():
        # A method's name becomes MLflow run names, metric and tag keys and report files: checked before any run.
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ConfigError(f"{where}: method name {name!r} becomes MLflow keys and file names, so it may hold only "
                              f"letters, digits, _, - and . (e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', str(name))!r})")
        entry = _mapping(entry, f"{where}: method {name}")
        unknown = sorted(map(str, set(entry) - METHOD_KEYS))
        if unknown:
            raise ConfigError(f"{where}: method {name} has unknown keys {', '.join(unknown)}; a method has "
                              f"flags, grid and reuse")
        grid = entry.get("grid", {})
        if "grid" in entry and not grid:
            raise ConfigError(f"{where}: method {name} has an empty grid; list values for at least one flag, or "
                              f"remove grid to run the method's flags as they are")
        grid = _mapping(grid, f"{where}: the grid of method {name}")
        for flag, values in grid.items():
            if not isinstance(values, list):
                grid[flag] = values = [values]
            if not values:
                raise ConfigError(f"{where}: the grid of method {name} has no values for {flag}; list at least one")
        reuse = entry.get("reuse", [])
        reuse = [reuse] if isinstance(reuse, str) else list(reuse)
        methods[name] = Method(str(name), _mapping(entry.get("flags"), f"{where}: the flags of method {name}"),
                               grid, reuse)
    for name, method in methods.items():
        unknown = [r for r in method.reuse if r not in methods]
        if unknown:
            raise ConfigError(f"{where}: method {name} reuses {', '.join(map(str, unknown))}, which the file does not "
                              f"define; reuse one of {', '.join(str(n) for n in methods if n != name)}")
    _check_no_cycle(methods, where)
    return methods


def _check_no_cycle(methods: dict[str, Method], where: str) -> None:
    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise ConfigError(f"{where}: methods reuse each other in a circle ({' → '.join(path + [name])}); "
                              f"break the circle")
        for other in methods[name].reuse:
            visit(other, path + [name])

    for name in methods:
        visit(name, [])


def _parse(parse, argv: list[str], where: str):
    """main.py's own parsing of a cell's flags; argparse's complaint becomes one sentence."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse(argv)
    except SystemExit:
        message = captured.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ConfigError(f"{where}: {message}; fix the sweep file") from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _check_runs(sweep: Sweep) -> None:
    """Parse every configuration as main.py would, and check the selection metric is one the runs log."""
    stand_in = {}  # a reusing method is checked with the first configuration of each method it reuses
    for stage in sweep.stages():
        for name in stage:
            configurations = sweep.methods[name].configurations(stand_in)
            for config in configurations:
                cell = sweep.cells(name, config, sweep.search_seeds[:1])[0]
                where = f"sweep file {sweep.path}, method {name}"
                argv = cell.argv()
                known = set(flags_of(_parse(lambda tokens: full_parser(tokens)[0], argv, where)))
                unknown = sorted(map(str, set(cell.flags) - known))
                if unknown:
                    raise ConfigError(f"{where} sets {', '.join(unknown)}, which main.py does not accept for this "
                                      f"dataset, backbone and model; fix the names (see python main.py --help)")
                args = _parse(parse_args, argv, where)
                dataset = DATASETS.get(args.dataset)
                n_tasks = dataset.N_TASKS if args.n_tasks is None else args.n_tasks
                logged = logged_summary_metrics(dataset, n_tasks, args.eval_scope, args.last_k)
                if sweep.metric not in logged:
                    window = (f" (a run of {n_tasks} tasks logs a _last_K mean only for K below {n_tasks})"
                              if "_last_" in sweep.metric else "")
                    raise ConfigError(f"sweep file {sweep.path}: the selection metric {sweep.metric} is not logged by "
                                      f"the runs of method {name}{window}; choose one of {', '.join(sorted(logged))}")
            stand_in[name] = configurations[0]
