"""What memorization-aware replay costs on top of training: the proxy bookkeeping and the buffer selection.

The aim: the online proxy's per-step update and the end-of-task selection together cost under 5% of
a task's training time. Three models are built as main.py builds them (same seed, backbone, buffer):

- maer-proxy:  maer --mem_proxy learned_iteration --buffer_policy min
- maer-scores: maer --mem_proxy none --mem_scores <random float32 file of the right length> --buffer_policy min
- er:          er (reservoir), the baseline

Each is brought to the state after task 0 (a full buffer), then trains task 1 through the real `train_task` (begin_task, the epochs,
end_task), the three alternating in blocks, each first in turn; the table shows medians. Apart from
that whole-task time (iii) it times, on the same models and tensors:

- (i)  `MemorizationProxy.update` alone, with a real forward pass's stream rows (indices, logits,
       labels, per-example losses), per call, times the task's steps;
- (ii) `Maer.end_task` alone (re-selecting the task's share from all of its examples), and
       `Maer.begin_task` (shrinking the earlier classes), which runs once per task too.

overhead = ((i) + (ii) + begin_task) / (iii) of maer-proxy. The end-to-end difference of the whole-task
times against er is shown too (noisier: it is a difference of two medians; maer-scores - er is maer's own
cost without a proxy, maer-proxy - maer-scores the proxy's). The ResNet case's blocks are too short for
an end-to-end difference. Cases: seq-digits/mlp
(the full task, 10 epochs), seq-mnist/mlp (the full task, 1 epoch, batch 10) and seq-cifar10/resnet18
(a few steps per block, extrapolated to the full 50-epoch task), the last two on random images
written in the real on-disk formats to a temporary folder. Also shown: what maer's per-task logging
adds (task_record and the value histogram PNG), which is not training time.

    .venv/bin/python benchmarks/maer_overhead.py                       # about 3 min on 2 CPU cores
    .venv/bin/python benchmarks/maer_overhead.py --cases digits-mlp    # seconds
"""
from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backbones import BACKBONES  # noqa: E402
from benchmarks.engine_throughput import SilentLogger, cycled, data_path_for, machine, synchronize  # noqa: E402
from datasets import DATASETS  # noqa: E402
from continual.run import set_seed  # noqa: E402
from models import MODELS  # noqa: E402
from continual.args import parse_args  # noqa: E402
from utils.plots import close, value_histogram  # noqa: E402
from memorization.score_format import load_scores  # noqa: E402
from models._memorization_proxy import MemorizationProxy  # noqa: E402
from continual.records import RunRecords  # noqa: E402
from continual.training import RunState, train_task  # noqa: E402

SEED = 0
TASK = 1  # the timed task: the buffer already holds task 0, so replay, begin_task and end_task all do real work


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    backbone: str
    batch_size: int
    epochs: int  # of the real task (Mammoth's defaults)
    block_steps: int | None  # None: time the full task; else blocks of this many steps, extrapolated


CASES = (
    Case("digits-mlp", "seq-digits", "mlp", 32, 10, None),
    Case("mnist-mlp", "seq-mnist", "mlp", 10, 1, None),
    Case("cifar10-resnet18", "seq-cifar10", "resnet18", 32, 50, 3),
)
CONFIGS = {
    "maer-proxy": lambda scores: ["--model", "maer", "--buffer_policy", "min", "--mem_proxy", "learned_iteration"],
    "maer-scores": lambda scores: ["--model", "maer", "--buffer_policy", "min", "--mem_proxy", "none",
                                   "--mem_scores", scores],
    "er": lambda scores: ["--model", "er"],
}


class Bench:
    """One model built as main.py builds it, with its own dataset and run state."""

    def __init__(self, case: Case, config: str, data_path: str, scores_path: str, cli: argparse.Namespace):
        argv = ["--dataset", case.dataset, "--backbone", case.backbone, "--buffer_size", str(cli.buffer_size),
                "--lr", "0.1", "--batch_size", str(case.batch_size), "--n_epochs", str(case.epochs),
                "--seed", str(SEED), "--device", cli.device, "--data_path", data_path, "--non_verbose",
                *CONFIGS[config](scores_path)]
        self.args = parse_args(argv)
        set_seed(SEED)
        self.dataset = DATASETS.get(self.args.dataset)(self.args)
        if self.args.mem_scores:
            self.dataset.mem_scores = load_scores(self.args.mem_scores, self.dataset)
        backbone = BACKBONES.get(self.args.backbone)(self.args, self.dataset.SHAPE, self.dataset.N_CLASSES)
        self.model = MODELS.get(self.args.model)(backbone.to(self.args.device), self.dataset, self.args)
        self.state = RunState.fresh(self.dataset)

    def warm_up(self) -> None:
        """The state after task 0 without training all of it: er's reservoir has seen every task-0 example,
        maer's end_task(0) has selected the full buffer from them; two real steps warm the kernels up."""
        split = self.dataset.train_split(0)
        self.model.buffer.add_data(split.images, split.labels, indices=split.indices,
                                   task_labels=torch.zeros_like(split.indices))
        self.train(0, 2)  # maer's begin_task(0) empties its buffer; its end_task(0) fills it by the policy

    def train(self, task: int, steps: int | None) -> float:
        """Seconds for train_task on `task`: the full task (its epochs), or `steps` batches of one epoch."""
        args = copy.copy(self.args)
        split = self.dataset.train_split(task)
        if steps is None:
            data = split
        else:
            data = cycled(split, steps * args.batch_size)
            args.n_epochs = 1
        self.model.training_data = lambda t: data
        synchronize(args.device)
        start = time.perf_counter()
        train_task(self.model, self.dataset, task, args, RunRecords(SilentLogger()), self.state)
        synchronize(args.device)
        return time.perf_counter() - start


def timed(call, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def proxy_update_seconds(bench: Bench, kind: str, calls: int, repeats: int) -> float:
    """Median seconds of one MemorizationProxy.update on the tensors of a real training step."""
    model, dataset, args = bench.model, bench.dataset, bench.args
    split = dataset.train_split(TASK)
    rows = torch.randperm(len(split), device=split.labels.device)[:args.batch_size]
    raw, labels, indices = split.images[rows], split.labels[rows], split.indices[rows]
    replay = model.buffer.get_data(args.minibatch_size, transform=model.transform)
    outputs = model.net(torch.cat((dataset.train_transform(raw), replay["examples"])))  # with autograd, as in observe
    losses = F.cross_entropy(outputs, torch.cat((labels, replay["labels"])), reduction="none")
    proxy = MemorizationProxy(kind, len(dataset.train), args.device)
    b = len(labels)
    for _ in range(calls):  # warm-up: the first calls of a process run slower
        proxy.update(indices, outputs[:b], labels, losses[:b])
    times = [timed(lambda: [proxy.update(indices, outputs[:b], labels, losses[:b]) for _ in range(calls)],
                   args.device) / calls for _ in range(repeats)]
    return statistics.median(times)


def selection_seconds(bench: Bench, repeats: int) -> tuple[float, float]:
    """Median seconds of begin_task and of end_task of the timed task (alternating, as in a run)."""
    begin, end = [], []
    for _ in range(repeats):
        begin.append(timed(lambda: bench.model.lifecycle.begin_task(TASK), bench.args.device))
        end.append(timed(lambda: bench.model.lifecycle.end_task(TASK), bench.args.device))
    return statistics.median(begin), statistics.median(end)


def logging_seconds(bench: Bench, repeats: int) -> float:
    """Median seconds of maer's per-task record: task_record plus drawing and encoding the value histogram."""
    def once():
        record = bench.model.task_record(TASK)
        for everything, kept in record.get("histograms", {}).values():
            figure = value_histogram(everything, kept, "memorization values")
            figure.savefig(io.BytesIO(), format="png")
            close(figure)
    return statistics.median(timed(once, bench.args.device) for _ in range(repeats))


@dataclass
class Row:
    case: Case
    steps: int  # optimizer steps of the full task
    task: dict[str, float]  # median full-task seconds per config (measured or extrapolated)
    proxy_step: float  # (i) seconds per update call
    cumulative_step: float  # the same for the cumulative_loss proxy
    begin: dict[str, float]
    end: dict[str, float]
    logging: float
    extrapolated: bool

    @property
    def overhead(self) -> float:
        return (self.proxy_step * self.steps + self.end["maer-proxy"] + self.begin["maer-proxy"]) / self.task["maer-proxy"]


def measure(case: Case, cli: argparse.Namespace, scratch: Path) -> Row:
    data_path = "./data"
    if case.dataset != "seq-digits":
        data_path, _ = data_path_for(case.dataset, None, scratch)  # random images in the real on-disk format
    n_train = len(DATASETS.get(case.dataset)(parse_args(["--model", "sgd", "--lr", "0.1", "--dataset", case.dataset,
                                                         "--data_path", data_path, "--device", cli.device,
                                                         "--seed", str(SEED)])).train)
    scores_path = scratch / f"{case.dataset}_random_scores.npy"
    np.save(scores_path, np.random.default_rng(SEED).random(n_train, dtype=np.float32))
    benches = {name: Bench(case, name, data_path, str(scores_path), cli) for name in CONFIGS}
    task_size = len(benches["er"].dataset.train_split(TASK))
    steps_per_epoch = math.ceil(task_size / case.batch_size)
    steps = steps_per_epoch * case.epochs
    for bench in benches.values():
        bench.warm_up()
        bench.train(TASK, case.block_steps if case.block_steps else min(steps_per_epoch, 200))  # untimed
    repeats = cli.repeats if case.block_steps is None else cli.block_repeats
    times = {name: [] for name in benches}
    for repeat in range(repeats):
        order = list(benches) if repeat % 2 == 0 else list(benches)[::-1]
        for name in order:
            times[name].append(benches[name].train(TASK, case.block_steps))
    selection = {name: selection_seconds(b, cli.selection_repeats) for name, b in benches.items()}
    begin = {name: s[0] for name, s in selection.items()}
    end = {name: s[1] for name, s in selection.items()}
    if case.block_steps is None:
        task = {name: statistics.median(t) for name, t in times.items()}
    else:  # per step from the blocks (less their begin/end), times the full task's steps, plus begin/end once
        task = {name: (statistics.median(t) - begin[name] - end[name]) / case.block_steps * steps + begin[name]
                + end[name] for name, t in times.items()}
    proxy_bench = benches["maer-proxy"]
    calls = 500
    proxy_step = proxy_update_seconds(proxy_bench, "learned_iteration", calls, cli.selection_repeats)
    cumulative_step = proxy_update_seconds(proxy_bench, "cumulative_loss", calls, cli.selection_repeats)
    logging = logging_seconds(proxy_bench, 3)
    print(f"  {case.name}: task {TASK} has {task_size} examples, {steps} steps; whole-task seconds "
          + "; ".join(f"{n} {' '.join(f'{v:.3f}' for v in t)}" for n, t in times.items()), flush=True)
    return Row(case, steps, task, proxy_step, cumulative_step, begin, end, logging, case.block_steps is not None)


def table(rows: list[Row]) -> str:
    head = ("| case | steps/task | (iii) task s: er / maer-proxy / maer-scores | (i) proxy update µs/step (ms/task) "
            "| (ii) end_task ms | begin_task ms | ((i)+(ii)+begin) / (iii) | end-to-end vs er: proxy / scores "
            "| cumulative_loss µs/step | logging ms/task |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.task
        e2e = " / ".join(f"{100 * (t[n] - t['er']) / t['er']:+.1f}%" for n in ("maer-proxy", "maer-scores"))
        if r.extrapolated:
            e2e = "– (blocks too short)"
        lines.append(
            f"| {r.case.name} | {r.steps}{' (extrapolated)' if r.extrapolated else ''} | "
            f"{t['er']:.3g} / {t['maer-proxy']:.3g} / {t['maer-scores']:.3g} | "
            f"{1e6 * r.proxy_step:.0f} ({1e3 * r.proxy_step * r.steps:.1f}) | "
            f"{1e3 * r.end['maer-proxy']:.2f} (scores {1e3 * r.end['maer-scores']:.2f}) | "
            f"{1e3 * r.begin['maer-proxy']:.2f} | {100 * r.overhead:.2f}% | "
            f"{e2e} | {1e6 * r.cumulative_step:.0f} | {1e3 * r.logging:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--buffer_size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7, help="alternating whole-task blocks per model")
    parser.add_argument("--block_repeats", type=int, default=3, help="alternating blocks per model, ResNet case")
    parser.add_argument("--selection_repeats", type=int, default=7, help="timings of begin/end_task and the proxy")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=[c.name for c in CASES])
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = cli.device if torch.device(cli.device).type != "cuda" else \
        f"{cli.device} ({torch.cuda.get_device_name(cli.device)})"
    print(f"machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} intra-op threads; device "
          f"{device}; buffer {cli.buffer_size}; timed task {TASK}", flush=True)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for case in CASES:
            if case.name in cli.cases:
                rows.append(measure(case, cli, Path(scratch)))
    print()
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
