"""Training throughput of `er` through this engine against a straightforward Mammoth-style pipeline.

Both sides train the same backbone (same class, same seed, same SGD learning rate) with Experience
Replay and a reservoir buffer, at the same stream batch and replay minibatch size, in one process:

- ours: the dataset, backbone and model built as main.py builds them, trained by `train_task`
  (one epoch over the task's examples, cycled to the number of steps asked for);
- straightforward: a `Dataset` of PIL images with per-sample torchvision transforms behind a
  `DataLoader`, and an ER whose float32 CPU buffer is filled one example at a time by a Python
  reservoir loop and whose replay batch is augmented per example through PIL (old Mammoth).

Throughput counts stream images per second (not the replayed ones). The sides alternate in short
timed blocks (--repeats of them, each --steps long); the table shows each side's median and the
median of the per-block ratios, so background load favours neither. A benchmark, not a test: it
prints a table and never fails on a slow machine.

    .venv/bin/python benchmarks/engine_throughput.py
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from backbones import BACKBONES  # noqa: E402
from benchmarks.estimator import cpu_model  # noqa: E402
from datasets import DATASETS  # noqa: E402
from datasets.cifar import RELEASES  # noqa: E402
from datasets.mnist import FILES as MNIST_FILES  # noqa: E402
from continual.run import set_seed  # noqa: E402
from models import MODELS  # noqa: E402
from continual.args import parse_args  # noqa: E402
from datasets import ContinualDataset, Split  # noqa: E402
from continual.records import RunRecords  # noqa: E402
from continual.training import RunState, train_task  # noqa: E402

SEED = 0
WORKER_COUNTS = (0, 2)  # DataLoader workers tried for the straightforward side; it gets the faster
LR = 0.1  # Mammoth's ER learning rate on both seq-mnist and seq-cifar10; it does not change the speed


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    backbone: str
    batch_size: int  # stream batch and replay minibatch alike
    warmup: int  # steps run before timing: first-call allocations, allocator and thread-pool warm-up


CASES = (
    Case("mnist-mlp-b10", "seq-mnist", "mlp", 10, warmup=50),
    Case("mnist-mlp-b128", "seq-mnist", "mlp", 128, warmup=20),
    Case("cifar10-resnet18-b32", "seq-cifar10", "resnet18", 32, warmup=2),
)


# -- data ---------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: 0, 0, 0x08 (unsigned byte), ndim; big-endian uint32 dims; raw bytes."""
    with open(path, "wb") as f:
        f.write(bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_synthetic_mnist(root: Path) -> None:
    """60,000 + 10,000 random 28×28 images, 10 balanced classes, as MNIST's four idx files."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.permutation(np.arange(n) % 10))


def write_synthetic_cifar10(root: Path) -> None:
    """Five training batches and one test batch of 10,000 random images each, as CIFAR-10's pickles."""
    folder_name, train_files, test_files, label_key = RELEASES[10]
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for name in train_files + test_files:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 label_key: rng.permutation(np.arange(10_000) % 10).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def data_path_for(dataset: str, requested: str | None, scratch: Path) -> tuple[str, bool]:
    """The folder to read `dataset` from: `requested` if it holds the release, else synthetic files in `scratch`."""
    if dataset == "seq-mnist":
        folder, files, write = "MNIST/raw", list(MNIST_FILES), write_synthetic_mnist
    else:
        folder, train_files, test_files, _ = RELEASES[10]
        files, write = train_files + test_files, write_synthetic_cifar10
    if requested and all((Path(requested) / folder / f).exists() for f in files):
        return requested, False
    if not all((scratch / folder / f).exists() for f in files):
        write(scratch)
    return str(scratch), True


# -- ours ---------------------------------------------------------------------------------------------
class SilentLogger:
    """Stands in for the MLflow RunLogger: `train_task` only logs the epoch losses (and step covariates)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_series(self, name: str, values: list, first_step: int) -> None:
        pass


def cycled(split: Split, n: int) -> Split:
    """The first n examples of the split, starting over from its beginning when it runs out."""
    rows = torch.arange(n, device=split.labels.device) % len(split)
    return Split(split.images[rows], split.labels[rows], split.indices[rows])


class Ours:
    """ER built exactly as main.py builds it, trained through the real `train_task` on task 0."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        set_seed(args.seed)
        self.dataset = DATASETS.get(args.dataset)(args)
        backbone = BACKBONES.get(args.backbone)(args, self.dataset.SHAPE, self.dataset.N_CLASSES).to(args.device)
        self.model = MODELS.get(args.model)(backbone, self.dataset, args)
        self.state = RunState.fresh(self.dataset)
        self.task = self.dataset.train_split(0)

    def seconds(self, steps: int) -> float:
        data = cycled(self.task, steps * self.args.batch_size)
        self.model.training_data = lambda task: data  # the task truncated (or cycled) to `steps` batches
        synchronize(self.args.device)
        start = time.perf_counter()
        train_task(self.model, self.dataset, 0, self.args, RunRecords(SilentLogger()), self.state)  # ends with a device sync
        return time.perf_counter() - start


# -- straightforward ----------------------------------------------------------------------------------
def mammoth_transforms(dataset: ContinualDataset) -> tuple[transforms.Compose, transforms.Compose | None]:
    """Old Mammoth's per-sample training transform, and the one its buffer applies to a replayed tensor."""
    if not dataset.CROP_PADDING and not dataset.FLIP and dataset.MEAN is None:
        return transforms.ToTensor(), None  # seq-mnist: no augmentation; Mammoth replays buffer tensors as stored
    train = transforms.Compose([
        transforms.RandomCrop(dataset.SHAPE[1], padding=dataset.CROP_PADDING),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(dataset.MEAN, dataset.STD),
    ])
    return train, transforms.Compose([transforms.ToPILImage(), train])


class PILImages(Dataset):
    """Mammoth's dataset: PIL images, augmented per sample, returned with the non-augmented tensor for the buffer."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, length: int, transform: transforms.Compose):
        channels_last = images.transpose(0, 2, 3, 1)
        self.images = [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in channels_last]
        self.labels = labels.tolist()
        self.length = length  # cycled over the images, like `cycled` on our side
        self.transform = transform
        self.not_aug_transform = transforms.ToTensor()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        image, label = self.images[i % len(self.images)], self.labels[i % len(self.labels)]
        return self.transform(image), label, self.not_aug_transform(image)


def reservoir(n_seen: int, capacity: int) -> int:
    """Mammoth's reservoir: the slot for the next example, or -1 to drop it."""
    if n_seen < capacity:
        return n_seen
    slot = np.random.randint(0, n_seen + 1)
    return slot if slot < capacity else -1


class LoopBuffer:
    """Mammoth's old buffer: float32 CPU tensors, one Python-loop insertion per stream example."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.capacity = capacity
        self.examples = torch.zeros((capacity, *shape), dtype=torch.float32)
        self.labels = torch.zeros(capacity, dtype=torch.int64)
        self.n_seen = 0

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor) -> None:
        for example, label in zip(examples, labels):
            slot = reservoir(self.n_seen, self.capacity)
            self.n_seen += 1
            if slot >= 0:
                self.examples[slot] = example.cpu()
                self.labels[slot] = label.cpu()

    def get_data(self, size: int, transform: transforms.Compose | None, device: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        choice = np.random.choice(len(self), size=min(size, len(self)), replace=False)
        if transform is None:
            examples = self.examples[choice]
        else:
            examples = torch.stack([transform(example) for example in self.examples[choice]])
        return examples.to(device), self.labels[choice].to(device)


class Straightforward:
    """Old Mammoth's ER over a PIL DataLoader, with the same backbone, seed and SGD learning rate as ours."""

    def __init__(self, args: argparse.Namespace, ours: Ours, length: int):
        self.args = args
        set_seed(args.seed)
        dataset = ours.dataset
        self.net = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES).to(args.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=args.lr)
        self.loss = nn.CrossEntropyLoss()
        self.buffer = LoopBuffer(args.buffer_size, dataset.SHAPE)
        train_transform, self.replay_transform = mammoth_transforms(dataset)
        self.data = PILImages(ours.task.images.cpu().numpy(), ours.task.labels.cpu().numpy(), length, train_transform)

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, not_aug_inputs: torch.Tensor) -> float:
        batch_size = len(labels)
        self.opt.zero_grad()
        if len(self.buffer):
            replay_x, replay_y = self.buffer.get_data(self.args.minibatch_size, self.replay_transform, self.args.device)
            inputs, labels = torch.cat((inputs, replay_x)), torch.cat((labels, replay_y))
        loss = self.loss(self.net(inputs), labels)
        loss.backward()
        self.opt.step()
        self.buffer.add_data(not_aug_inputs, labels[:batch_size])
        return loss.item()  # Mammoth reads the loss back every step

    def start(self, workers: int, warmup: int):
        """A DataLoader iterator, with worker start-up and `warmup` steps done before any clock starts."""
        self.net.train()
        batches = iter(DataLoader(self.data, batch_size=self.args.batch_size, shuffle=True, num_workers=workers))
        self.seconds(batches, warmup)
        return batches

    def seconds(self, batches, steps: int) -> float:
        """Train `steps` batches from a started iterator (its workers keep prefetching between calls)."""
        device = self.args.device
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            inputs, labels, not_aug = next(batches)
            self.observe(inputs.to(device), labels.to(device), not_aug)
        synchronize(device)
        return time.perf_counter() - start


# -- measurement --------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    case: Case
    steps: int
    ours: float  # stream images per second, median over repeats
    straightforward: float
    workers: int  # DataLoader workers of the faster straightforward variant
    ratios: list[float]  # ours / straightforward within each repeat; the table shows their median


def measure(case: Case, cli: argparse.Namespace, scratch: Path) -> Row:
    steps = cli.steps if case.backbone == "resnet18" else cli.mlp_steps
    data_path, synthetic = data_path_for(case.dataset, cli.data_path, scratch)
    batch = str(case.batch_size)
    args = parse_args(["--model", "er", "--dataset", case.dataset, "--backbone", case.backbone,
                       "--buffer_size", str(cli.buffer_size), "--lr", str(LR), "--batch_size", batch,
                       "--minibatch_size", batch, "--n_epochs", "1", "--seed", str(SEED),
                       "--device", cli.device, "--data_path", data_path, "--non_verbose"])
    ours = Ours(args)
    straightforward = Straightforward(args, ours, length=(case.warmup + steps * cli.repeats) * case.batch_size)
    ours.seconds(case.warmup)
    loaders = {w: straightforward.start(w, case.warmup) for w in WORKER_COUNTS}
    ours_rates, straight_rates = [], {w: [] for w in WORKER_COUNTS}
    for repeat in range(cli.repeats):
        # Short blocks that alternate sides, each side first in turn: a burst of background load hits
        # both sides of a repeat, and the median over repeats drops the bursts.
        order = ["ours", *loaders] if repeat % 2 == 0 else [*loaders, "ours"]
        for who in order:
            if who == "ours":
                ours_rates.append(steps * case.batch_size / ours.seconds(steps))
            else:
                straight_rates[who].append(steps * case.batch_size / straightforward.seconds(loaders[who], steps))
        if repeat == 0:  # every worker count once, then only the faster carries on (a ResNet step is slow)
            chosen = max(loaders, key=lambda w: straight_rates[w][0])
            loaders = {chosen: loaders[chosen]}  # dropping an iterator stops its workers
    print(f"  {case.name}: {'synthetic' if synthetic else 'real'} data; ours "
          f"{' '.join(map(rate, ours_rates))} img/s; straightforward "
          + "; ".join(f"{w} workers {' '.join(map(rate, rates))}" for w, rates in straight_rates.items()),
          flush=True)
    best = straight_rates[chosen]
    return Row(case, steps, statistics.median(ours_rates), statistics.median(best), chosen,
               [o / s for o, s in zip(ours_rates, best)])


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    return f"{cpu_model()}, {available_cores()} cores available"


def load_average() -> str:
    """How busy the machine is with other work (1, 5 and 15 minute averages)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def rate(images_per_second: float) -> str:
    return f"{images_per_second:.0f}" if images_per_second >= 100 else f"{images_per_second:.1f}"


def table(rows: list[Row]) -> str:
    head = f"{'case':<22}{'batch/mb':>9}{'timed steps':>13}{'ours img/s':>12}{'straightforward img/s':>24}" \
           f"{'ours/straightforward':>22}{'range':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        straight = f"{rate(r.straightforward)} ({r.workers} workers)"
        lines.append(f"{r.case.name:<22}{f'{r.case.batch_size}/{r.case.batch_size}':>9}"
                     f"{f'{len(r.ratios)}x{r.steps}':>13}"
                     f"{rate(r.ours):>12}{straight:>24}{statistics.median(r.ratios):>21.2f}x"
                     f"{f'{min(r.ratios):.2f}-{max(r.ratios):.2f}':>13}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side and repeat, ResNet-18 case")
    parser.add_argument("--mlp_steps", type=int, default=100, help="timed steps per side and repeat, MLP cases")
    parser.add_argument("--repeats", type=int, default=5, help="alternating blocks per side; the table shows medians")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--buffer_size", type=int, default=500)
    parser.add_argument("--data_path", default=None,
                        help="folder with the real MNIST / CIFAR-10 files; synthetic ones are written otherwise")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=[c.name for c in CASES])
    cli = parser.parse_args()
    if cli.threads is not None:
        torch.set_num_threads(cli.threads)
    device = cli.device
    if torch.device(device).type == "cuda":
        device += f" ({torch.cuda.get_device_name(device)})"
    print(f"machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} intra-op threads; "
          f"device {device}; buffer {cli.buffer_size}; {cli.repeats} repeats; load average {load_average()}",
          flush=True)
    if torch.get_num_threads() > 1 and hasattr(os, "getloadavg") and os.getloadavg()[0] >= available_cores() / 2:
        # Measured: with other jobs on the cores, OpenMP's busy-waiting intra-op threads make small
        # steps 5-15x slower on both sides, unevenly; one thread (or OMP_WAIT_POLICY=PASSIVE) does not.
        print("note: other work is running on these cores; with several intra-op threads the figures swing "
              "widely, --threads 1 gives steadier ones", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for case in CASES:
            if case.name in cli.cases:
                rows.append(measure(case, cli, Path(scratch)))
    print(f"\nload average (1, 5, 15 min) at the end: {load_average()}")
    print(table(rows))


if __name__ == "__main__":
    main()
