"""What `main.py --forgetting_events` costs: time per epoch of ER with and without the recording.

One ER model is built as main.py builds it (buffer 200) and trains task 0 through the real `train_task`;
blocks of one epoch alternate between recording (the forward hook in every `observe` and the counter's
update) and not, each first in turn, and the table shows the median time per epoch of each and their
ratio (CPU time of the process on the CPU, so that other jobs on a shared machine count less; wall time
on CUDA). Cases: seq-digits/mlp (the whole task), seq-mnist/mlp at batch 10 and seq-cifar10/resnet18 at
batch 32 on the first `--examples` examples of the task (on the CPU at most 2000 and 64), the last two
on random images written in the real on-disk formats to a temporary folder (or the release files under
--data_path).

    .venv/bin/python benchmarks/forgetting_overhead.py                        # about 2 min on 2 CPU cores
    .venv/bin/python benchmarks/forgetting_overhead.py --cases digits-mlp     # seconds
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from backbones import BACKBONES  # noqa: E402
from benchmarks._timing import benchmark_parser, describe_device, end_load_line, machine_line, timed  # noqa: E402
from benchmarks.engine_throughput import SilentLogger, data_path_for  # noqa: E402
from continual.args import parse_args  # noqa: E402
from continual.forgetting import StreamRecorder  # noqa: E402
from continual.run import set_seed  # noqa: E402
from continual.records import RunRecords  # noqa: E402
from continual.training import RunState, train_task  # noqa: E402
from datasets import DATASETS, Split  # noqa: E402
from models import MODELS  # noqa: E402

# name: dataset, backbone, batch size, examples per epoch on the CPU (all of --examples on CUDA)
CASES = {"digits-mlp": ("seq-digits", "mlp", 32, 2000), "mnist-mlp": ("seq-mnist", "mlp", 10, 2000),
         "cifar10-resnet18": ("seq-cifar10", "resnet18", 32, 64)}


def build(dataset_name: str, backbone: str, batch_size: int, data_path: str, device: str, examples: int):
    args = parse_args(["--dataset", dataset_name, "--backbone", backbone, "--model", "er", "--buffer_size", "200",
                       "--lr", "0.05", "--batch_size", str(batch_size), "--n_epochs", "1", "--seed", "0",
                       "--device", device, "--data_path", data_path, "--non_verbose"])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    model = MODELS.get(args.model)(BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES).to(device),
                                   dataset, args)
    split = dataset.train_split(0)
    keep = slice(0, min(examples, len(split)))
    model.training_data = lambda task: Split(split.images[keep], split.labels[keep], split.indices[keep])
    return args, dataset, model, min(examples, len(split))


def measure(case: str, cli) -> tuple[float, float, int]:
    dataset_name, backbone, batch_size, cpu_examples = CASES[case]
    examples = cli.examples if torch.device(cli.device).type == "cuda" else min(cli.examples, cpu_examples)
    with tempfile.TemporaryDirectory() as scratch:
        data_path = cli.data_path if dataset_name == "seq-digits" else data_path_for(dataset_name, cli.data_path,
                                                                                       Path(scratch))[0]
        args, dataset, model, n = build(dataset_name, backbone, batch_size, data_path, cli.device, examples)
    plain, recording = RunState.fresh(dataset), RunState.fresh(dataset)
    recording.forgetting = StreamRecorder(len(dataset.train), cli.device)
    # CPU time of this process on the CPU (other jobs on a shared machine do not count), wall time on CUDA
    clock = time.perf_counter if torch.device(cli.device).type == "cuda" else time.process_time
    for state in (plain, recording):  # warm-up, untimed
        train_task(model, dataset, 0, args, RunRecords(SilentLogger()), state)
    seconds = {"plain": [], "recording": []}
    for repeat in range(cli.repeats):
        order = [("plain", plain), ("recording", recording)][:: 1 if repeat % 2 == 0 else -1]
        for name, state in order:
            seconds[name].append(timed(lambda: train_task(model, dataset, 0, args, RunRecords(SilentLogger()), state),
                                       cli.device, clock))
    return statistics.median(seconds["plain"]), statistics.median(seconds["recording"]), n


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=11, help="epochs timed with and without recording, each")
    parser.add_argument("--examples", type=int, default=2000, help="training examples of task 0 per epoch, at most")
    parser.add_argument("--data_path", default="./data")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line(describe_device(cli.device)))
    print("\n| case | examples per epoch | s/epoch without | s/epoch with --forgetting_events | ratio |")
    print("|---|---|---|---|---|")
    for case in cli.cases.split(","):
        plain, recording, n = measure(case, cli)
        print(f"| {case} | {n} | {plain:.4f} | {recording:.4f} | {recording / plain:.3f} |", flush=True)
    print(end_load_line())


if __name__ == "__main__":
    main()
