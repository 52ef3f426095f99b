"""What the lifecycle costs per step: the task loop's dispatcher against the bare step.

One ER model (buffer 200) on seq-digits with the mlp trains the same fixed batches two ways, in
alternating blocks of `--steps` steps, each first in turn: the bare step (`observe`, zero_grad,
backward, the optimizer's step: what a hand-written loop does) and the framework's
(`model.lifecycle.observe` + `model.lifecycle.step`: the events to every component, their counts, the
stream batch). A third row keeps the stream batch's logits as well, which a component with
`NEEDS_OUTPUTS = True` asks for (a forward hook in `observe`). The table gives the median CPU time per
step of each and the ratio to the bare step. The digits MLP is the smallest network the framework runs,
so the dispatcher's share is largest there.

    .venv/bin/python benchmarks/lifecycle_overhead.py        # about 20 s on 2 CPU cores
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from backbones import BACKBONES  # noqa: E402
from benchmarks._timing import benchmark_parser, end_load_line, machine_line  # noqa: E402
from continual.args import parse_args  # noqa: E402
from continual.run import set_seed  # noqa: E402
from datasets import DATASETS  # noqa: E402
from models import MODELS  # noqa: E402


def build(device: str):
    args = parse_args(["--dataset", "seq-digits", "--model", "er", "--buffer_size", "200", "--lr", "0.05",
                       "--batch_size", "32", "--seed", "0", "--device", device, "--non_verbose"])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    model = MODELS.get(args.model)(BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES).to(device),
                                   dataset, args)
    split = dataset.train_split(0)
    batches = []
    for start in range(0, len(split) - 31, 32):
        raw = split.images[start:start + 32]
        batches.append((raw, split.labels[start:start + 32], split.indices[start:start + 32]))
    return model, dataset, batches


def bare(model, dataset, batch) -> None:
    raw, labels, indices = batch
    loss = model.observe(dataset.train_transform(raw), labels, raw, indices, 0)
    model.opt.zero_grad(set_to_none=True)
    loss.backward()
    model.opt.step()


def framework(model, dataset, batch) -> None:
    raw, labels, indices = batch
    loss = model.lifecycle.observe(dataset.train_transform(raw), labels, raw, indices, 0)
    model.lifecycle.step(loss)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=9, help="blocks of each way")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    model, dataset, batches = build(cli.device)
    ways = {"bare step": (bare, False), "lifecycle": (framework, False), "lifecycle, logits kept": (framework, True)}
    seconds = {name: [] for name in ways}
    step = 0
    for repeat in range(cli.repeats + 1):  # the first round warms up and is not kept
        names = list(ways)
        names = names[repeat % len(names):] + names[:repeat % len(names)]  # each way first in turn
        for name in names:
            function, outputs = ways[name]
            type(model).NEEDS_OUTPUTS = outputs
            start = time.process_time()
            for _ in range(cli.steps):
                function(model, dataset, batches[step % len(batches)])
                step += 1
            if repeat:
                seconds[name].append((time.process_time() - start) / cli.steps)
    type(model).NEEDS_OUTPUTS = False
    print(machine_line(cli.device, "seq-digits, mlp 64-100-100-10, ER buffer 200, batch 32, 1 thread"))
    base = statistics.median(seconds["bare step"])
    print("\n| way | µs/step (median CPU time) | ratio to the bare step |\n|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e6:.0f} | {median / base:.2f} |")
    print(end_load_line())


if __name__ == "__main__":
    main()
