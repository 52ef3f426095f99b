"""Models per hour of split training: one ensemble of K models against the same K one at a time.

Every way runs the engine's `train_group` on a plan built exactly as train_splits.py builds it
(`parse_args`, `make_plan`, `load_plan_data`), in one process: one at a time is K calls with one id
each, two ways: the `--ensemble 1` path (the engine with K = 1) and the textbook loop (`TextbookModel`: the
`nn.Module`'s forward, autograd's backward, torch's SGD); an ensemble is one call with K model ids,
timed three ways: the engine's own (`build_ensemble` picks `StackedMLP` for the mlp backbone: weights
[K, out, in], one `baddbmm` per layer, the backward pass written out), the same stacked weights with
autograd's backward (the straightforward way), and the vmapped `Ensemble` forced onto the same MLP
(benchmarks/ensemble_training_models.py; the engine's path for every other backbone). Same models,
seeds, subsets and settings: an MLP with SGD (lr 0.1, momentum 0.9), batch 32, subset ratio 0.5; a
64-256-10 MLP on seq-digits, and a 784-100-100-10 MLP on synthetic MNIST-sized images (see
`write_mnist_like`). Each figure is the median over --repeats; the order of the ways alternates
between repeats, so background load favours none of them.

The arithmetic floor of an ensemble is its matrix-multiply FLOPs (forward, weight gradients and the
input gradients of every layer but the first, plus the evaluation passes) at the rate `torch.bmm`
reaches on the same [K, ...] shapes, each product in its faster orientation, measured in the same
process just before each ensemble run (benchmarks/ensemble_training_floor.py), with the clock the ratio
uses: on the CPU the process's CPU time, for the floor's products and for the run (time in which another
job had the core then counts in neither); on CUDA wall time after a synchronize. Each
repeat's run is divided by the floor measured just before it; the table shows the median ratio and its
range. It also counts the models whose stored predictions are the same bits as one at a time.
--profile prints torch.profiler's operator table instead; --step_costs the cost of one training step
per way (--compile adds each step through torch.compile).
A benchmark, not a test: it prints tables and never fails on a slow machine.

    .venv/bin/python benchmarks/ensemble_training.py       # about 14 minutes on 2 cores shared with another job
    .venv/bin/python benchmarks/ensemble_training.py --step_costs [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_splits  # noqa: E402
from benchmarks._timing import (benchmark_parser, describe_device, end_load_line, machine_line,  # noqa: E402
                                median_seconds)
from benchmarks.engine_throughput import synchronize, write_idx  # noqa: E402
from benchmarks.ensemble_training_floor import (ensemble_flops_per_model, flops, layer_widths,  # noqa: E402
                                                matmul_rate, step_matmuls)
from benchmarks.ensemble_training_models import LABELS, WAYS, TextbookModel, built_as, train_step  # noqa: E402
from datasets.mnist import FILES as MNIST_FILES  # noqa: E402
from memorization.driver import make_plan  # noqa: E402
from memorization.plan import Plan  # noqa: E402
from memorization.training import PlanData, build_backbones, load_plan_data, recipe, train_group  # noqa: E402

BATCH = 32


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    hidden: str  # --mlp_hidden
    epochs_flag: str  # the flag of this script that sets its epochs


CASES = {
    "digits": Case("seq-digits 64-256-10", "seq-digits", "256", "epochs"),
    "mnist": Case("MNIST-sized 784-100-100-10", "seq-mnist", "100,100", "mnist_epochs"),
}


# -- data and plans -----------------------------------------------------------------------------------
def write_mnist_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """MNIST's four idx files holding n_train + n_test learnable 28×28 images (synthetic, not MNIST).

    Each class has a random template of strokes (a fifth of the pixels); an image lights a random
    tenth of its class's template and 15% of all pixels as noise, on a black background (mean
    intensity about 0.13, as MNIST's). The networks fit their subsets and reach about 55% on the
    test images, so the accuracy of the two ways can be compared; images of uniform noise with
    random labels leave only chance, and make lr 0.1 diverge for some networks.
    """
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.2
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10)
        lit = (templates[labels] & (rng.random((n, 28, 28)) < 0.1)) | (rng.random((n, 28, 28)) < 0.15)
        images = np.where(lit, rng.integers(128, 256, (n, 28, 28)), 0)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)


def build_plan(case: Case, epochs: int, n_models: int, data_path: str, out: Path, device: str) -> Plan:
    """The plan train_splits.py would write for these settings (not written: only held in memory)."""
    args = train_splits.parse_args([
        "--dataset", case.dataset, "--backbone", "mlp", "--mlp_hidden", case.hidden, "--batch_size", str(BATCH),
        "--lr", "0.1", "--optim_mom", "0.9", "--subset_ratio", "0.5", "--n_epochs", str(epochs),
        "--n_models", str(n_models), "--data_path", data_path, "--out", str(out), "--device", device,
        "--non_verbose"])
    return make_plan(args)


# -- measurement ---------------------------------------------------------------------------------------
@dataclass
class Trained:
    seconds: float  # wall seconds of the train_group call
    cpu_seconds: float  # CPU seconds of this process meanwhile: less sensitive to other jobs on the machine
    train_accuracy: list[float]  # per model, on its own subset, after the last epoch
    test_accuracy: list[float]
    digests: list[str]  # per model, a hash of every array train_group returned for it


def digest(arrays: dict[str, np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for key in sorted(arrays):
        hasher.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    return hasher.hexdigest()


# where train_group builds each way (None: the engine's own choice)
CONTEXTS = {None: contextlib.nullcontext, "textbook": lambda: built_as(TextbookModel),
            **{name: way.context for name, way in WAYS.items()}}


def train_models(plan: Plan, data: PlanData, model_ids: list[int], device: str, way: str | None = None) -> Trained:
    """train_group on these models, the engine's way or, with `way`, inside that way's context ("textbook": one
    `TextbookModel` at a time)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with CONTEXTS[way]():
        results = train_group(plan, model_ids, data, device)
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    train_accuracy = [float(results[i]["correct_train"][-1][plan.inclusion_mask[i]].mean()) for i in model_ids]
    test_accuracy = [float(results[i]["correct_test"][-1].mean()) for i in model_ids]
    return Trained(seconds, cpu_seconds, train_accuracy, test_accuracy, [digest(results[i]) for i in model_ids])


@dataclass
class Row:
    case: str
    way: str
    size: int
    alone: list[float]  # seconds per model one at a time (the engine with K = 1), each repeat
    textbook: list[float]  # seconds per model one at a time in the textbook loop, each repeat
    together: list[float]  # seconds per model in the ensemble, each repeat
    cpu_speedups: list[float]  # the speed-up in CPU seconds, each repeat
    floor: list[float]  # floor seconds per model, each repeat
    floor_ratios: list[float]  # each repeat's ensemble seconds per model over its floor, in the floor's clock
    accuracy: dict  # "alone" / "together" → (mean train accuracy, mean test accuracy)
    identical: int  # models whose arrays are the same bits as one at a time (first repeat)

    @property
    def speedups(self) -> list[float]:
        return [a / t for a, t in zip(self.alone, self.together)]

    @property
    def textbook_speedups(self) -> list[float]:
        return [a / t for a, t in zip(self.textbook, self.together)]


def plan_and_data(case: Case, cli: argparse.Namespace, scratch: Path, epochs: int) -> tuple[Plan, PlanData]:
    """The case's plan of max(--sizes) models and its data, the synthetic MNIST files written first if needed."""
    if case.dataset == "seq-mnist" and not (scratch / "MNIST").exists():
        write_mnist_like(scratch, cli.mnist_train, cli.mnist_test)
    plan = build_plan(case, epochs, max(cli.sizes), str(scratch), scratch / f"store-{epochs}", cli.device)
    return plan, load_plan_data(plan, str(scratch), cli.device)


def ways(cli: argparse.Namespace) -> list[str]:
    """The vectorised ways to time (keys of ensemble_training_models.WAYS), the engine first."""
    return ["engine"] + [way for way in cli.ways if way != "engine"]


def measure(case: Case, cli: argparse.Namespace, scratch: Path) -> list[Row]:
    n_models = max(cli.sizes)
    plan, data = plan_and_data(case, cli, scratch, getattr(cli, case.epochs_flag))
    widths = layer_widths(plan, data)
    # One short run of every way first: one-time costs (vmap set-up, kernel selection) stay off the clock.
    warmup, _ = plan_and_data(case, cli, scratch, 1)
    train_models(warmup, data, [0], cli.device)
    for size in cli.sizes:
        for way in ways(cli):
            train_models(warmup, data, list(range(size)), cli.device, way)
    flops_per_model = ensemble_flops_per_model(plan, widths)
    on_cpu = torch.device(cli.device).type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter  # the floor's, as the ratio's run time
    alone_runs, textbook_runs, together_runs, floors = [], [], {}, {}
    for repeat in range(cli.repeats):
        steps = ["alone", "textbook"] + [(way, size) for size in cli.sizes for way in ways(cli)]
        for step in (steps if repeat % 2 == 0 else steps[::-1]):
            if step in ("alone", "textbook"):
                runs = alone_runs if step == "alone" else textbook_runs
                runs.append([train_models(plan, data, [i], cli.device, None if step == "alone" else step)
                             for i in range(n_models)])
                print(f"  {case.name} repeat {repeat}: one at a time{', textbook loop' * (step == 'textbook')} "
                      f"{statistics.mean(r.seconds for r in runs[-1]):.2f} s/model", flush=True)
            else:
                way, size = step
                rate = matmul_rate(widths, BATCH, size, cli.device, clock=clock)
                floors.setdefault(step, []).append(flops_per_model / rate)
                trained = train_models(plan, data, list(range(size)), cli.device, way)
                together_runs.setdefault(step, []).append(trained)
                print(f"  {case.name} repeat {repeat}: {LABELS[way]} K={size} {trained.seconds / size:.2f} s/model "
                      f"(bmm {rate / 1e9:.0f} GFLOP/s)", flush=True)
    rows = []
    for way, size in [(w, s) for s in cli.sizes for w in ways(cli)]:
        alone = [statistics.mean(r.seconds for r in run[:size]) for run in alone_runs]
        textbook = [statistics.mean(r.seconds for r in run[:size]) for run in textbook_runs]
        runs = together_runs[(way, size)]
        cpu_speedups = [sum(r.cpu_seconds for r in run[:size]) / together.cpu_seconds
                        for run, together in zip(alone_runs, runs)]
        accuracy = {"alone": (statistics.mean(a for r in alone_runs[0][:size] for a in r.train_accuracy),
                              statistics.mean(a for r in alone_runs[0][:size] for a in r.test_accuracy)),
                    "textbook": (statistics.mean(a for r in textbook_runs[0][:size] for a in r.train_accuracy),
                                 statistics.mean(a for r in textbook_runs[0][:size] for a in r.test_accuracy)),
                    "together": (statistics.mean(runs[0].train_accuracy), statistics.mean(runs[0].test_accuracy))}
        identical = sum(r.digests[0] == d for r, d in zip(alone_runs[0][:size], runs[0].digests))
        ratios = [(r.cpu_seconds if on_cpu else r.seconds) / size / floor
                  for r, floor in zip(runs, floors[(way, size)])]
        rows.append(Row(case.name, LABELS[way], size, alone, textbook, [r.seconds / size for r in runs], cpu_speedups,
                        floors[(way, size)], ratios, accuracy, identical))
    return rows


# -- report --------------------------------------------------------------------------------------------
HEADER = ("| case | ensemble | K | one at a time s/model | ensemble s/model | speed-up (range) | speed-up in CPU time "
          "| textbook loop s/model | speed-up on the textbook loop (range) "
          "| models/h one at a time | models/h ensemble | train acc % one / textbook / ens "
          "| test acc % one / textbook / ens | same bits as one at a time | floor s/model | ensemble/floor (range) |")


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        alone, textbook, together, floor = (statistics.median(v) for v in (r.alone, r.textbook, r.together, r.floor))
        speedup, textbook_speedup = statistics.median(r.speedups), statistics.median(r.textbook_speedups)
        accuracy = [" / ".join(f"{100 * r.accuracy[way][split]:.1f}" for way in ("alone", "textbook", "together"))
                    for split in (0, 1)]
        lines.append(f"| {r.case} | {r.way} | {r.size} | {alone:.3f} | {together:.3f} | {speedup:.2f}x "
                     f"({min(r.speedups):.2f}-{max(r.speedups):.2f}) | {statistics.median(r.cpu_speedups):.2f}x "
                     f"| {textbook:.3f} | {textbook_speedup:.2f}x ({min(r.textbook_speedups):.2f}-"
                     f"{max(r.textbook_speedups):.2f}) | {3600 / alone:,.0f} | {3600 / together:,.0f} "
                     f"| {accuracy[0]} | {accuracy[1]} "
                     f"| {r.identical} of {r.size} | {floor:.3f} | {statistics.median(r.floor_ratios):.2f} "
                     f"({min(r.floor_ratios):.2f}-{max(r.floor_ratios):.2f}) |")
    return "\n".join(lines)


def accuracy_check(rows: list[Row]) -> list[str]:
    """A sentence per row whose mean accuracy differs by more than one point between a way one at a time (the
    engine's or the textbook loop) and the ensemble."""
    problems = []
    for r in rows:
        for alone, name in (("alone", "one at a time"), ("textbook", "in the textbook loop")):
            for split, a, t in zip(("train", "test"), r.accuracy[alone], r.accuracy["together"]):
                if abs(a - t) > 0.01:
                    problems.append(f"{r.case}, {r.way} K={r.size}: mean {split} accuracy {100 * a:.1f}% {name}, "
                                    f"{100 * t:.1f}% in the ensemble")
    return problems


def profile(case: Case, cli: argparse.Namespace, scratch: Path) -> None:
    """Operator table (self time, by input shape) of a few epochs of the largest ensemble, each way."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    size = max(cli.sizes)
    plan, data = plan_and_data(case, cli, scratch, cli.profile_epochs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(cli.device).type == "cuda" else [])
    for way in ways(cli):
        train_models(plan, data, list(range(size)), cli.device, way)  # warm-up
        with torch_profile(activities=activities, record_shapes=True) as prof:
            trained = train_models(plan, data, list(range(size)), cli.device, way)
        print(f"\n{case.name}, {LABELS[way]} K={size}, {cli.profile_epochs} epochs: {trained.seconds:.2f} s")
        on_cuda = torch.device(cli.device).type == "cuda"
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total" if on_cuda else "self_cpu_time_total", row_limit=cli.profile_rows,
            max_name_column_width=34, max_shapes_column_width=70))


def step_costs(case: Case, cli: argparse.Namespace, scratch: Path) -> None:
    """Microseconds of one training step (forward, loss, backward, SGD) on fixed inputs, per way and K.

    The step of train_group without its data gathering and evaluation; median of --step_samples steps,
    in CPU time on CPU (robust to other jobs on the machine), wall time after a synchronize elsewhere;
    the floor's matmuls are timed with the same clock.
    """
    plan, data = plan_and_data(case, cli, scratch, 1)
    training = recipe(plan.settings["training"])
    widths = layer_widths(plan, data)
    on_cpu = torch.device(cli.device).type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter

    def median(work) -> float:
        return median_seconds(work, cli.device, cli.step_samples, clock)

    print(f"\n{case.name}: one training step, {'CPU' if on_cpu else 'wall'} µs, median of {cli.step_samples}")
    print("| K | way | µs per step | µs per model | matmul floor µs per step | step/floor |")
    print("|---|---|---|---|---|---|")
    for size in [1, *cli.sizes]:
        x = torch.rand(size, BATCH, *data.dataset.SHAPE, device=cli.device)
        y = torch.randint(0, data.dataset.N_CLASSES, (size, BATCH), device=cli.device)
        rate = matmul_rate(widths, BATCH, size, cli.device, clock=clock)
        floor = size * flops(step_matmuls(widths, BATCH)) / rate
        for way in ways(cli):
            name = LABELS[way] + (" = the --ensemble 1 path" if (size, way) == (1, "engine") else "")
            for compiled in [False] + [True] * cli.compile:
                ensemble = WAYS[way].build(build_backbones(plan, list(range(size)), data, cli.device), training)
                step = median(train_step(ensemble, x, y, compiled))
                print(f"| {size} | {name}{', torch.compile' * compiled} | {step * 1e6:.0f} | {step * 1e6 / size:.0f} "
                      f"| {floor * 1e6:.0f} | {step / floor:.1f} |", flush=True)
    rows = torch.randint(0, len(data.train_labels), (max(cli.sizes) * BATCH,), device=cli.device)
    gathers = {"images.index_select(0, rows) (the engine's)": lambda: data.train_images.index_select(0, rows),
               "images[rows]": lambda: data.train_images[rows]}
    print(f"gathering the uint8 images of one K={max(cli.sizes)} step: " + "; ".join(
        f"{name} {median(gather) * 1e6:.0f} µs" for name, gather in gathers.items()))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the seq-digits case")
    parser.add_argument("--mnist_epochs", type=int, default=10, help="epochs of the MNIST-sized case")
    parser.add_argument("--mnist_train", type=int, default=6000, help="synthetic MNIST training images")
    parser.add_argument("--mnist_test", type=int, default=1000, help="synthetic MNIST test images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="ensemble sizes K")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way; the table shows the medians")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU; 0 keeps torch's default (one per core). One, "
                             "because at these sizes a second thread gains little and, on a machine shared "
                             "with other jobs, its waits made training 10-20x slower")
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS),
                        help="the ways to time besides the engine: the stacked MLP with autograd's backward, and "
                             "the vmapped Ensemble, each forced onto the MLP in this benchmark only")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table, print torch.profiler's operator table of the largest ensemble")
    parser.add_argument("--profile_epochs", type=int, default=5)
    parser.add_argument("--profile_rows", type=int, default=25)
    parser.add_argument("--step_costs", action="store_true",
                        help="instead of the table, print the cost of one training step per way and K")
    parser.add_argument("--step_samples", type=int, default=200)
    parser.add_argument("--compile", action="store_true",
                        help="with --step_costs, also time each way's step through torch.compile")
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    print(machine_line(describe_device(cli.device, "bf16 autocast"), f"{cli.repeats} repeats"), flush=True)
    rows = []
    for key in cli.cases:
        with tempfile.TemporaryDirectory() as scratch:
            if cli.profile:
                profile(CASES[key], cli, Path(scratch))
            elif cli.step_costs:
                step_costs(CASES[key], cli, Path(scratch))
            else:
                rows += measure(CASES[key], cli, Path(scratch))
    if cli.profile or cli.step_costs:
        return
    print(end_load_line())
    print(table(rows))
    problems = accuracy_check(rows)
    print("\naccuracy: " + ("the same within one point in every row" if not problems else "; ".join(problems)))


if __name__ == "__main__":
    main()
