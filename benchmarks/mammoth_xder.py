"""X-DER against Mammoth's X-DER on seq-cifar10-shaped files, over seeds.

    .venv/bin/python benchmarks/mammoth_xder.py --seeds 3 --jobs 2

Mammoth's xder.py needs its dataset's denormalisation transform, which its seq-mnist lacks, so the two are
compared on seq-cifar10: both programs read the same CIFAR-10 pickles (`cifar-10-batches-py`, written
here from scikit-learn's digits: the first `--per_class` training and 20 test images of each class,
upsampled to 32x32 and repeated over the three channels), ResNet-18, 3 epochs, batch 32, lr 0.1,
buffer 200 and X-DER's seq-cifar100 hyperparameters from configs/best (the network learns little from
this much data in fewer steps). Mammoth runs through
`benchmarks/mammoth_trace.py --trust_files` (torchvision's MD5 check of the release files would refuse
files written here). The two cannot be identical run for run: their augmentations draw differently (Mammoth
per example with PIL transforms, this program per batch on tensors), so the table gives the final class-IL
and task-IL accuracy over seeds and Welch's p. Records go to a JSON-lines file, so a comparison resumes.
"""
from __future__ import annotations

import os

ENVIRONMENT = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.engine_throughput import load_average, machine  # noqa: E402
from benchmarks.mammoth_parity import welch_p  # noqa: E402
from benchmarks.mammoth_runs import mammoth_matrices, ours_matrices  # noqa: E402
from benchmarks.startup import ensure_clip_cache  # noqa: E402
from datasets.digits import load_digits_split  # noqa: E402

FLAGS = ["--model", "xder", "--dataset", "seq-cifar10", "--backbone", "resnet18", "--lr", "0.1", "--batch_size", "32",
         "--n_epochs", "3", "--buffer_size", "200", "--minibatch_size", "32", "--alpha", "0.3", "--beta", "0.8",
         "--gamma", "0.85", "--lambd", "0.05", "--constr_eta", "0.001", "--constr_margin", "0.7", "--simclr_temp", "5",
         "--simclr_batch_size", "64", "--simclr_num_aug", "2", "--align_bn", "0"]


def per_class(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
    rows.sort()
    return images[rows], labels[rows]


def as_cifar(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 1, 8, 8] → CIFAR's rows: uint8 [N, 3072], 32x32 bilinear, the gray level in every channel."""
    x = F.interpolate(torch.from_numpy(images).float(), size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return x.reshape(len(x), -1).numpy()


def write_digits_as_cifar10(root: Path, n_train: int, n_test: int) -> None:
    """Five training pickles (the training rows split in order) and a test pickle, plus batches.meta, in
    CIFAR-10's python layout under root/CIFAR10/cifar-10-batches-py (where both programs look)."""
    train_x, train_y, test_x, test_y = load_digits_split()
    (train_x, train_y), (test_x, test_y) = per_class(train_x, train_y, n_train), per_class(test_x, test_y, n_test)
    folder = root / "CIFAR10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(train_y)), 5)
    for i, rows in enumerate(parts, start=1):
        batch = {"batch_label": f"training batch {i} of 5", "data": as_cifar(train_x[rows]),
                 "labels": train_y[rows].tolist(), "filenames": [f"{r}.png" for r in rows]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"batch_label": "testing batch 1 of 1", "data": as_cifar(test_x), "labels": test_y.tolist(),
            "filenames": [f"{r}.png" for r in range(len(test_y))]}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {"label_names": [str(c) for c in range(10)], "num_cases_per_batch": len(parts[0]), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def run_one(side: str, seed: int, data: Path, scratch: Path, cli, env: dict[str, str]) -> dict:
    if side == "mammoth":
        argv = [cli.mammoth_python, str(REPO / "benchmarks" / "mammoth_trace.py"), "--mammoth", str(cli.mammoth),
                "--trust_files", "--", *FLAGS, "--seed", str(seed), "--base_path", f"{data}/", "--non_verbose", "1",
                "--num_workers", "0"]
    else:
        argv = [sys.executable, str(REPO / "main.py"), *FLAGS, "--seed", str(seed), "--data_path", str(data),
                "--device", "cpu", "--num_threads", "2", "--non_verbose",
                "--tracking_uri", f"sqlite:///{scratch}/ours-{seed}.db"]
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
    matrices = (mammoth_matrices if side == "mammoth" else ours_matrices)(done.stdout)
    if done.returncode != 0 or matrices is None:
        sys.exit(f"{side} xder seed {seed} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}")
    return {"side": side, "seed": seed, "per_class": cli.per_class, "matrices": matrices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"), help="Mammoth's work tree")
    parser.add_argument("--mammoth_python", default="/work/mammoth-venv/bin/python",
                        help="the interpreter of a venv with Mammoth's requirements")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per_class", type=int, default=64,
                        help="training images of each class (a task's two classes must fill whole batches of 32: Mammoth's "
                             "xder.py indexes its last batch as a full one)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mammoth_xder.jsonl"))
    cli = parser.parse_args()
    env = {k: v for k, v in ENVIRONMENT.items() if k not in ("PYTHONPATH", "WANDB_ENTITY", "WANDB_PROJECT")}
    env.update({"HF_HUB_OFFLINE": "1"})
    print(f"machine: {machine()}; load average (1, 5, 15 min) {load_average()}", flush=True)
    print(ensure_clip_cache(cli.mammoth, cli.mammoth_python, env))
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    records = [r for r in records if r["per_class"] == cli.per_class]
    done = {(r["side"], r["seed"]) for r in records}
    todo = [(side, seed) for seed in range(cli.seeds) for side in ("mammoth", "ours") if (side, seed) not in done]
    with tempfile.TemporaryDirectory(prefix="mammoth-xder-") as scratch, out.open("a") as sink:
        data = Path(scratch) / "data"
        write_digits_as_cifar10(data, cli.per_class, 20)
        with ThreadPoolExecutor(cli.jobs) as pool:
            for record in pool.map(lambda job: run_one(*job, data, Path(scratch), cli, env), todo):
                print(f"  {record['side']} seed {record['seed']}: final class-IL "
                      f"{statistics.mean(record['matrices'][0][-1]):.2f}", flush=True)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                records.append(record)
    print("| setting | Mammoth | ours | p (Welch) |\n|---|---|---|---|")
    for s, setting in enumerate(("class-IL", "task-IL")):
        values = {side: [statistics.mean(r["matrices"][s][-1]) for r in records if r["side"] == side]
                  for side in ("mammoth", "ours")}
        cells = [f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} (n={len(v)})" for v in values.values()]
        print(f"| {setting} | {cells[0]} | {cells[1]} | {welch_p(values['ours'], values['mammoth']):.2f} |")
    print(f"load average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
