"""Per-step cost of the plasticity methods on top of plain training (Vanilla: `--model sgd`, no plasticity).

The aim: cbp, redo and snr_v2 each add under 10% to a training step of the ViT study's L3 ViT
(depth 3, width 48, 3 heads, patch 4, MLP ratio 4, ReLU; Adam lr 1e-3, eps 1e-7) at batch 100 on
32×32×3 images. Every model is built as main.py builds it (`parse_args`, `set_seed`, the registries)
with `--model sgd` plus one method's flags, so the method acts through the task loop's
the model's lifecycle step (backward, the methods' `after_backward`, Adam, their `after_step`)
and the UnitMonitor's forward hooks (benchmarks/plasticity_overhead_bench.py builds and times them).

What is timed: one training step as the task loop takes it, `model.observe(inputs, labels, ...)` for
the loss and then the lifecycle's step, on the same few fixed batches for every method (drawn from task 0
and augmented once), so data loading and augmentation are not in it. The dataset is seq-cifar10 on
random images written in CIFAR-10's pickle format to a temporary folder (continual-imagenet needs the
Imagenet32 files); its head has 10 outputs instead of 2, which does not change the per-step cost
noticeably.

Every method does its real work when timed:

- The network and Adam's state are those after `--warmup` steps of Vanilla (L3: 120, one task of the
  seed stream), loaded into every model, so all are timed at the same point of training.
- Each method's own state is brought forward, then it trains `--settle` steps of its own before the
  timing: cbp's unit ages are advanced by 120 steps (all units past the maturity of 100, so it resets
  ρ · eligible units per step from the start: an upper end, as in a long run about half the units are
  immature); snr and snr_v2 estimate their thresholds at the last settle step (with their default
  update probabilities the first estimate comes after 480 and 90 steps on average, and thresholds start
  infinite, so no unit would be reset before it). `--own_warmup` instead trains every method `--warmup`
  steps from initialisation, with nothing brought forward or forced (every method pays the warm-up).
- The resets actually performed while timed are counted (`plasticity.units.take_resets()`), and the
  table shows them per step, so a reader sees that the methods did their work.

Methods (rows): cbp (ρ 1e-2, maturity 100), redo with `--redo_prob` 1/(0.5·120) (the seed sweep's best
k = .5: one dormancy check every 60 steps on average) and with `--redo_every 1` (the check every step,
the worst case; it resets nothing when no unit is dormant), snr_v2 and snr with their defaults, l2,
l2init, shrink_perturb, and `--covariates` alone (the statistics hooks and ages, no method). The median
hides the rare steps of redo k=.5 and of the threshold re-estimates: their average cost lies between
the k=.5 row and the every-step row.

The methods alternate in blocks of `--steps` steps, each first in turn, for `--repeats` rounds (by
default blocks of one step, so a burst of load from other jobs hits every method alike: 70 rounds on
L3, 5 on L12). The table
shows the median ms per step and the overhead against Vanilla three ways: from the medians, the median
(and range) of the per-round ratios, and from each method's fastest block. On a machine shared with
other jobs these swing by several percent, so it also shows the time measured directly inside the
UnitMonitor's forward hooks (timed by two hooks of this script, one just before and one just after)
and inside `after_backward` + `after_step`, and the direct overhead: that time less Vanilla's, over
Vanilla's median step. A second case, the L12 ViT (depth 12, width 192) at batch 100, times Vanilla,
cbp, redo k=.5 and snr_v2 after 3 Vanilla steps (a step takes seconds there).

`--profile cbp snr_v2 ...` prints, for each named method, torch.profiler's operators run inside the
hooks and the plasticity calls, by self CPU time per step. `--prototype` adds rows for every method
with hidden units whose UnitMonitor hook counts positive activations as `h.sign().clamp_(min=0).sum()`
instead of `(h > 0).sum()` and sums h instead of |h| behind a ReLU (a change proposed for
utils/units.py, patched in here; not library code).
A benchmark, not a test: it prints a table and never fails on a slow machine.

    .venv/bin/python benchmarks/plasticity_overhead.py                          # about 4.5 min on 2 CPU cores
    .venv/bin/python benchmarks/plasticity_overhead.py --cases vit-l3 --steps 5 --repeats 3    # about 1 min
    .venv/bin/python benchmarks/plasticity_overhead.py --cases vit-l3 --methods cbp snr_v2 --prototype --profile cbp
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks._timing import benchmark_parser, describe_device, end_load_line, machine_line, spread  # noqa: E402
from benchmarks.engine_throughput import data_path_for  # noqa: E402
from benchmarks.plasticity_overhead_bench import PROPOSED, Bench, profile  # noqa: E402
from continual.args import parse_args  # noqa: E402
from continual.run import set_seed  # noqa: E402
from datasets import DATASETS  # noqa: E402

SEED = 0
BATCH = 100
N_BATCHES = 4  # fixed batches, cycled; the same ones for every method
STEPS_PER_TASK = 120  # the seed stream: 1200 images per task, batch 100, 10 epochs
COMMON = ["--model", "sgd", "--dataset", "seq-cifar10", "--backbone", "vit", "--vit_heads", "3", "--vit_patch", "4",
          "--vit_mlp_ratio", "4", "--vit_act", "relu", "--optimizer", "adam", "--optim_eps", "1e-7", "--lr", "1e-3",
          "--batch_size", str(BATCH), "--seed", str(SEED), "--non_verbose"]
METHODS = {  # row name -> flags on top of Vanilla
    "vanilla": [],
    "cbp": ["--plasticity", "cbp", "--cbp_rho", "1e-2", "--cbp_maturity", "100"],
    "redo k=.5": ["--plasticity", "redo", "--redo_prob", repr(1 / (0.5 * STEPS_PER_TASK))],
    "redo every step": ["--plasticity", "redo", "--redo_every", "1"],
    "snr_v2": ["--plasticity", "snr_v2"],
    "snr": ["--plasticity", "snr"],
    "l2": ["--plasticity", "l2"],
    "l2init": ["--plasticity", "l2init"],
    "shrink_perturb": ["--plasticity", "shrink_perturb"],
    "covariates": ["--covariates"],
}
AIM = ("cbp", "redo k=.5", "snr_v2")  # the methods the 10% aim is about


@dataclass(frozen=True)
class Case:
    name: str
    depth: int
    width: int
    methods: tuple[str, ...]
    steps: int  # default timed steps per block
    repeats: int  # default rounds of blocks
    settle: int  # default steps each method trains on its own before the timing
    warmup: int  # default Vanilla steps before that (cbp's ages are brought forward by a task's steps anyway)


CASES = (
    Case("vit-l3", 3, 48, tuple(METHODS), steps=1, repeats=70, settle=10, warmup=STEPS_PER_TASK),
    Case("vit-l12", 12, 192, ("vanilla", "cbp", "redo k=.5", "snr_v2"), steps=1, repeats=5, settle=1, warmup=3),
)


def case_argv(case: Case, cli: argparse.Namespace, method: str = "vanilla") -> list[str]:
    """main.py's flags of `method` on the case's ViT: Vanilla's, with the method's on top."""
    return [*COMMON, "--vit_depth", str(case.depth), "--vit_width", str(case.width), "--device", cli.device,
            "--data_path", cli.data_path, *METHODS[method]]


def fixed_batches(dataset, device: str) -> list[tuple[torch.Tensor, ...]]:
    """N_BATCHES batches of task 0, augmented once: (inputs, raw images, labels, indices)."""
    split = dataset.train_split(0)
    set_seed(SEED)
    rows = torch.randperm(len(split), device=split.labels.device)[: N_BATCHES * BATCH].view(N_BATCHES, BATCH)
    return [(dataset.train_transform(split.images[r]).to(device), split.images[r], split.labels[r], split.indices[r])
            for r in rows]


@dataclass
class Row:
    case: Case
    method: str
    wall: list[float]  # seconds per step, one per block
    calls: list[float]  # seconds per step inside after_backward + after_step
    hooks: list[float]  # seconds per step inside the UnitMonitor's forward hooks
    resets: int
    timed_steps: int
    wall_ratios: list[float]  # this block / Vanilla's block of the same round


def measure(case: Case, cli: argparse.Namespace) -> list[Row]:
    steps = cli.steps or case.steps
    repeats = cli.repeats or case.repeats
    settle = case.settle if cli.settle is None else max(cli.settle, 1)
    methods = [m for m in case.methods if m in cli.methods or m == "vanilla"]
    warmup = case.warmup if cli.warmup is None else cli.warmup
    dataset = DATASETS.get("seq-cifar10")(parse_args(case_argv(case, cli)))
    batches = fixed_batches(dataset, cli.device)
    started = time.perf_counter()
    benches = {name: Bench(case_argv(case, cli, name), name, dataset) for name in methods}
    if cli.prototype:  # the same methods with the proposed statistics hook
        for name in methods:
            if name != "vanilla" and benches[name].model.plasticity.units is not None:
                benches[name + PROPOSED] = Bench(case_argv(case, cli, name), name, dataset, proposed=True)
    methods = list(benches)
    if cli.own_warmup:
        for bench in benches.values():
            bench.train(batches, warmup)
    else:
        vanilla = benches["vanilla"]
        vanilla.train(batches, warmup)
        for bench in benches.values():
            if bench is not vanilla:
                bench.model.net.load_state_dict(vanilla.model.net.state_dict())
                bench.model.opt.load_state_dict(vanilla.model.opt.state_dict())
                bench.bring_forward(max(warmup, STEPS_PER_TASK))
    for bench in benches.values():
        bench.settle(batches, settle, force_estimate=not cli.own_warmup)
    print(f"  {case.name}: {'own' if cli.own_warmup else 'shared'} warm-up of {warmup} steps and {settle} settle "
          f"steps per method took {time.perf_counter() - started:.0f} s; timing {repeats} rounds × {steps} steps",
          flush=True)
    wall, calls, hooks = defaultdict(list), defaultdict(list), defaultdict(list)
    resets = defaultdict(int)
    for repeat in range(repeats):
        shift = repeat % len(methods)
        for name in methods[shift:] + methods[:shift]:  # each first in turn
            w, k, h, r = benches[name].block(batches, steps)
            wall[name].append(w)
            calls[name].append(k)
            hooks[name].append(h)
            resets[name] += r
    rows = []
    for name in methods:
        rows.append(Row(case, name, wall[name], calls[name], hooks[name], resets[name], steps * repeats,
                        [a / b for a, b in zip(wall[name], wall["vanilla"])]))
    states = [s for s in (bench.state() for bench in benches.values()) if s]
    if states:
        print(f"  {case.name}, after the timing: " + "; ".join(states), flush=True)
    if repeats <= 10:
        print(f"  {case.name}: ms per step by round: " + "; ".join(
            f"{n} {' '.join(f'{1e3 * t:.1f}' for t in wall[n])}" for n in methods), flush=True)
    else:
        print(f"  {case.name}: ms per step, fastest / quartiles / slowest of the rounds: " + "; ".join(
            f"{n} {' / '.join(f'{1e3 * t:.0f}' for t in spread(wall[n]))}" for n in methods), flush=True)
    for name in cli.profile:
        for key in (name, name + PROPOSED):
            if key in benches:
                profile(benches[key], batches, cli.profile_steps)
    return rows


def percent(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def table(rows: list[Row]) -> str:
    head = ("| case | method | ms/step | overhead: of medians | per round, median (range) | of fastest blocks "
            "| µs/step in hooks + before/after_step | direct overhead | resets/step |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    vanilla = {r.case.name: r for r in rows if r.method == "vanilla"}
    for r in rows:
        base = vanilla[r.case.name]
        wall, base_wall = statistics.median(r.wall), statistics.median(base.wall)
        hooks, calls = statistics.median(r.hooks), statistics.median(r.calls)
        inside = f"{1e6 * hooks:.0f} + {1e6 * calls:.0f}"
        name = f"**{r.method}**" if r.method in AIM else r.method
        if r is base:
            lines.append(f"| {r.case.name} | {name} | {1e3 * wall:.1f} | – | – | – | {inside} | – | – |")
            continue
        direct = (hooks + calls - statistics.median(base.calls)) / base_wall
        lines.append(
            f"| {r.case.name} | {name} | {1e3 * wall:.1f} | {percent(wall / base_wall)} | "
            f"{percent(statistics.median(r.wall_ratios))} ({percent(min(r.wall_ratios))} to "
            f"{percent(max(r.wall_ratios))}) | {percent(min(r.wall) / min(base.wall))} | "
            f"{inside} | {percent(1 + direct)} | {r.resets / r.timed_steps:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=[c.name for c in CASES])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="rows to time (Vanilla always is)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per block (None: 1, so the methods alternate step by step)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of blocks (None: L3 70, L12 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Vanilla steps before the timing (None: L3 120, one task of the seed stream; L12 3)")
    parser.add_argument("--settle", type=int, default=None, help="steps each method trains on its own before the "
                        "timing (None: L3 10, L12 1)")
    parser.add_argument("--own_warmup", action="store_true",
                        help="every method trains --warmup steps from initialisation itself (nothing brought forward)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--prototype", action="store_true",
                        help="also time each method with units through the proposed statistics hook (not library code)")
    parser.add_argument("--profile", nargs="*", default=[], choices=[m for m in METHODS if m != "vanilla"],
                        help="methods to profile with torch.profiler after the timing")
    parser.add_argument("--profile_steps", type=int, default=10)
    parser.add_argument("--data_path", default=None,
                        help="folder with the real CIFAR-10 files; random ones are written otherwise")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    print(machine_line(describe_device(cli.device), f"batch {BATCH}"), flush=True)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cli.data_path, _ = data_path_for("seq-cifar10", cli.data_path, Path(scratch))
        for case in CASES:
            if case.name in cli.cases:
                rows.extend(measure(case, cli))
    print(end_load_line())
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
