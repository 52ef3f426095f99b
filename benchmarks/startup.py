"""Start-up and a short whole run of this repository's main.py against Mammoth's main.py.

Each timed command is a fresh subprocess with its own interpreter (sys.executable for ours, Mammoth's
venv python for Mammoth), in its own repository as working directory, with the same environment. The
two programs alternate (ours first on even rounds, Mammoth first on odd ones) over --repeats rounds,
after one untimed warm-up of each (page cache, .pyc files, MLflow's tables). Cases:

- help:     `main.py --dataset seq-mnist --model er --buffer_size 200 --help`, the same argv for both
            (Mammoth's bare `--help` only prints its usage and the error "the following arguments are
            required: --dataset, --model", and with er it also asserts that --buffer_size is given);
- argerror: `main.py --dataset seq-mnist --model nosuchmodel`, which both reject while parsing (exit 2);
- run:      one epoch of ER on seq-mnist, batch 10 (replay minibatch 10), lr 0.1, buffer 200, MLP
            784-100-100-10, seed = round, on the CPU; both print their final class-IL accuracy, which
            the table shows beside the times.

The seq-mnist data are MNIST's four idx files holding scikit-learn's 8x8 digits (the fixed stratified
80/20 split of datasets/digits.py) upsampled bilinearly to 28x28, written into a temporary folder D
where both read them: ours `--data_path D` (D/MNIST/raw), Mammoth `--base_path D/` (torchvision's
MNIST under root D/MNIST reads <root>/<class name>/raw, so D/MNIST/MNIST/raw for the test set and
D/MNIST/MyMNIST/raw for Mammoth's training set class MyMNIST).

Mammoth's datasets/seq_8vision.py builds CLIP ViT-B-16 with pretrained='openai' while its module is
imported, i.e. at every start of main.py; offline, this script puts a randomly initialised
ViT-B-16 state dict (safetensors, same size as the real one; only the transform is used) in the
Hugging Face cache layout under <mammoth>/checkpoints/ViT-B-16/cachedir/open_clip if none is there,
and both sides run with HF_HUB_OFFLINE=1 (ours does not read it). Mammoth's W&B is off by itself
(no --nowand flag any more: it logs only with --wandb_entity/--wandb_project or their env vars,
which are removed from the children's environment).

With --scripts_help it times instead the `--help` of this repository's four scripts (main.py, main.py --model
derpp, train_splits.py, eval_splits.py, sweep.py) as fresh processes, in this checkout and in the checkouts named by
--compare_tree (e.g. an export of an earlier commit), alternating scripts and trees in every round after an untimed
warm-up round (which also records each checkout's component catalogue); it needs no Mammoth.

A benchmark, not a test: it prints a table and never fails on a slow machine.

    .venv/bin/python benchmarks/startup.py --mammoth /work/mammoth --mammoth_python /work/mammoth-venv/bin/python
    .venv/bin/python benchmarks/startup.py --scripts_help --repeats 7 --compare_tree /tmp/before
"""
from __future__ import annotations

import os

ENVIRONMENT = dict(os.environ)  # before any import can set a thread count

import argparse  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.engine_throughput import load_average, machine, write_idx  # noqa: E402
from datasets.digits import load_digits_split  # noqa: E402
from datasets.mnist import FILES as MNIST_FILES  # noqa: E402

CASES = ("help", "argerror", "run")
CLIP_REPO = "checkpoints/ViT-B-16/cachedir/open_clip/models--timm--vit_base_patch16_clip_224.openai"
CLIP_SNIPPET = f"""
import os, open_clip
from safetensors.torch import save_file
repo, rev = {CLIP_REPO!r}, "0" * 40
os.makedirs(os.path.join(repo, "snapshots", rev), exist_ok=True)
os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
open(os.path.join(repo, "refs", "main"), "w").write(rev)
model = open_clip.create_model("ViT-B-16", pretrained=None)
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
          os.path.join(repo, "snapshots", rev, "open_clip_model.safetensors"))
"""
OURS_ACCURACY = re.compile(r"^acc_class_il: ([0-9.]+)", re.MULTILINE)
MAMMOTH_ACCURACY = re.compile(r"Accuracy for (\d+) task\(s\):\s+\[Class-IL\]: ([0-9.]+) %")


# -- data ---------------------------------------------------------------------------------------------
def upsample(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 1, 8, 8] → uint8 [N, 28, 28], bilinear, rounded (the digits already span 0..255)."""
    x = F.interpolate(torch.from_numpy(images).float(), size=(28, 28), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def write_digits_as_mnist(root: Path, n_train: int | None = None, n_test: int | None = None) -> tuple[int, int]:
    """scikit-learn's digits, upsampled to 28x28, as MNIST's four idx files where both programs read them
    (the first n_train / n_test rows of each split where given)."""
    train_x, train_y, test_x, test_y = load_digits_split()
    train_x, train_y, test_x, test_y = train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test]
    arrays = {"train-images-idx3-ubyte": upsample(train_x), "train-labels-idx1-ubyte": train_y,
              "t10k-images-idx3-ubyte": upsample(test_x), "t10k-labels-idx1-ubyte": test_y}
    assert sorted(arrays) == sorted(MNIST_FILES)
    # ours: <data_path>/MNIST/raw; Mammoth (torchvision): <base_path>MNIST/<class name>/raw
    for sub in ("MNIST/raw", "MNIST/MNIST/raw", "MNIST/MyMNIST/raw"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            write_idx(folder / name, array)
    return len(train_y), len(test_y)


def ensure_clip_cache(mammoth: Path, python: str, env: dict[str, str]) -> str:
    """The ViT-B-16 weights Mammoth's seq_8vision.py loads at import time, random ones if none are cached."""
    snapshots = mammoth / CLIP_REPO / "snapshots"
    if any(snapshots.glob("*/open_clip_model.safetensors")) or any(snapshots.glob("*/open_clip_pytorch_model.bin")):
        return "ViT-B-16 weights already in Mammoth's open_clip cache"
    subprocess.run([python, "-c", CLIP_SNIPPET], cwd=mammoth, env=env, check=True)
    return "wrote random ViT-B-16 weights into Mammoth's open_clip cache (offline stand-in for 'openai')"


# -- commands -----------------------------------------------------------------------------------------
@dataclass
class Side:
    name: str
    python: str
    cwd: Path
    argv: dict[str, list[str]]  # case -> arguments after main.py; "{seed}" is filled in per round
    accuracy: re.Pattern
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    accuracies: list[float] = field(default_factory=list)

    def command(self, case: str, seed: int) -> list[str]:
        return [self.python, "main.py", *(a.replace("{seed}", str(seed)) for a in self.argv[case])]


def sides(cli: argparse.Namespace, data: Path, store: Path) -> tuple[Side, Side]:
    common_help = ["--dataset", "seq-mnist", "--model", "er", "--buffer_size", "200", "--help"]
    common_error = ["--dataset", "seq-mnist", "--model", "nosuchmodel"]
    ours_run = ["--model", "er", "--dataset", "seq-mnist", "--backbone", "mlp", "--mlp_hidden", "100,100",
                "--buffer_size", "200", "--lr", "0.1", "--batch_size", "10", "--n_epochs", "1",
                "--seed", "{seed}", "--data_path", str(data), "--tracking_uri", f"sqlite:///{store}/mlflow.db",
                "--non_verbose"]
    mammoth_run = ["--model", "er", "--dataset", "seq-mnist", "--backbone", "mnistmlp", "--buffer_size", "200",
                   "--lr", "0.1", "--batch_size", "10", "--minibatch_size", "10", "--n_epochs", "1",
                   "--seed", "{seed}", "--base_path", f"{data}/", "--non_verbose", "1"]
    if cli.mammoth_num_workers is not None:
        mammoth_run += ["--num_workers", str(cli.mammoth_num_workers)]
    ours = Side("ours", sys.executable, REPO, {"help": common_help, "argerror": common_error, "run": ours_run},
                OURS_ACCURACY)
    mammoth = Side("Mammoth", cli.mammoth_python, cli.mammoth,
                   {"help": common_help, "argerror": common_error, "run": mammoth_run}, MAMMOTH_ACCURACY)
    return ours, mammoth


def check(side: Side, case: str, rc: int, output: str) -> float | None:
    """The outcome each case must have (else the timing means nothing); the run's class-IL accuracy."""
    ok = {"help": rc == 0 and "usage:" in output and "--buffer_size" in output,
          "argerror": rc == 2 and "nosuchmodel" in output,
          "run": rc == 0}[case]
    accuracy = None
    if case == "run":
        matches = side.accuracy.findall(output)
        if side.name == "Mammoth":
            matches = [acc for tasks, acc in matches if tasks == "5"]
        ok = ok and bool(matches)
        accuracy = float(matches[-1]) if matches else None
    if not ok:
        sys.exit(f"{side.name} {case} did not do what it should (exit {rc}); the end of its output:\n{output[-3000:]}")
    return accuracy


def timed_run(side: Side, case: str, seed: int, env: dict[str, str]) -> tuple[float, float, float | None]:
    """Wall and CPU seconds (user + system of the process and its reaped children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(side.command(case, seed), cwd=side.cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, check(side, case, done.returncode, done.stdout)


# -- report -------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def accuracies(side: Side) -> str:
    if not side.accuracies:
        return "-"
    return f"{statistics.mean(side.accuracies):.1f} ({', '.join(f'{a:.1f}' for a in side.accuracies)})"


def table(cases: list[str], ours: Side, mammoth: Side) -> str:
    head = (f"{'case':<10}{'ours s min/med':>16}{'Mammoth s min/med':>19}{'ours/Mammoth':>14}"
            f"{'CPU s ours/Mammoth':>20}   class-IL acc % ours | Mammoth (mean (per seed))")
    lines = [head, "-" * len(head)]
    for case in cases:
        ratio = statistics.median(ours.seconds[case]) / statistics.median(mammoth.seconds[case])
        cpu = f"{statistics.median(ours.cpu[case]):.1f}/{statistics.median(mammoth.cpu[case]):.1f}"
        accs = f"{accuracies(ours)} | {accuracies(mammoth)}" if case == "run" else "-"
        lines.append(f"{case:<10}{spread(ours.seconds[case]):>16}{spread(mammoth.seconds[case]):>19}"
                     f"{ratio:>14.2f}{cpu:>20}   {accs}")
    return "\n".join(lines)


HELP_COMMANDS = (["main.py", "--help"], ["main.py", "--model", "derpp", "--help"], ["train_splits.py", "--help"],
                 ["eval_splits.py", "--help"], ["sweep.py", "--help"])


def scripts_help(trees: list[Path], repeats: int, env: dict[str, str]) -> None:
    """Wall seconds of each script's --help in each checkout: fresh processes, alternating, after a warm-up."""
    seconds: dict[tuple[str, str], list[float]] = {}
    print(f"machine: {machine()}; load average (1, 5, 15 min) at the start: {load_average()}", flush=True)
    for round_ in range(-1, repeats):
        for tree in (trees if round_ % 2 == 0 else trees[::-1]):
            for command in HELP_COMMANDS:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, *command], cwd=tree, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                wall = time.perf_counter() - start
                if done.returncode != 0 or "usage:" not in done.stdout:
                    sys.exit(f"{' '.join(command)} in {tree} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
                if round_ >= 0:
                    seconds.setdefault((str(tree), " ".join(command)), []).append(wall)
    print(f"\n{repeats} rounds, one untimed warm-up round; wall seconds min / median\n")
    print(f"{'command':<34}" + "".join(f"{str(tree)[-30:]:>32}" for tree in trees))
    for command in HELP_COMMANDS:
        name = " ".join(command)
        print(f"{name:<34}" + "".join(f"{spread(seconds[(str(tree), name)]):>32}" for tree in trees))
    print(f"\nload average (1, 5, 15 min) at the end: {load_average()}")


def version(python: str, cwd: Path, env: dict[str, str]) -> str:
    code = "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case, each running both programs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per case before the timed ones")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"), help="Mammoth's work tree")
    parser.add_argument("--mammoth_python", default="/work/mammoth-venv/bin/python",
                        help="the interpreter of a venv with Mammoth's requirements")
    parser.add_argument("--mammoth_num_workers", type=int, default=None,
                        help="--num_workers for Mammoth's run (None: Mammoth's own, min(8, CPUs))")
    parser.add_argument("--omp_num_threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both programs (None: unset)")
    parser.add_argument("--scripts_help", action="store_true",
                        help="time the --help of this repository's scripts instead (no Mammoth needed)")
    parser.add_argument("--compare_tree", type=Path, action="append", default=[],
                        help="with --scripts_help: another checkout to time alternately with this one (repeatable)")
    cli = parser.parse_args()
    if cli.scripts_help:
        scripts_help([REPO, *cli.compare_tree], cli.repeats, {k: v for k, v in ENVIRONMENT.items() if k != "PYTHONPATH"})
        return
    cases = [c for c in cli.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")

    env = {k: v for k, v in ENVIRONMENT.items()
           if k not in ("OMP_NUM_THREADS", "PYTHONPATH", "WANDB_ENTITY", "WANDB_PROJECT")}
    env["HF_HUB_OFFLINE"] = "1"
    if cli.omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = str(cli.omp_num_threads)

    with tempfile.TemporaryDirectory(prefix="startup-bench-") as scratch:
        data, store = Path(scratch) / "data", Path(scratch) / "store"
        store.mkdir()
        n_train, n_test = write_digits_as_mnist(data)
        clip_note = ensure_clip_cache(cli.mammoth, cli.mammoth_python, env)
        ours, mammoth = sides(cli, data, store)
        print(f"machine: {machine()}; OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', 'unset')}; HF_HUB_OFFLINE=1")
        print(f"ours:    {version(ours.python, ours.cwd, env)} ({ours.python}, {ours.cwd})")
        print(f"Mammoth: {version(mammoth.python, mammoth.cwd, env)} ({mammoth.python}, {mammoth.cwd}); {clip_note}")
        print(f"data: scikit-learn digits upsampled to 28x28 as MNIST idx files, {n_train} train / {n_test} test")
        for side in (ours, mammoth):
            for case in cases:
                print(f"{side.name:>7} {case}: {' '.join(side.command(case, 0))}")
        print(f"load average (1, 5, 15 min) at the start: {load_average()}", flush=True)

        for case in cases:
            for side in (ours, mammoth):
                side.seconds[case], side.cpu[case] = [], []
            for round_ in range(-cli.warmup, cli.repeats):
                seed = max(round_, 0)
                for side in ((ours, mammoth) if round_ % 2 == 0 else (mammoth, ours)):
                    wall, cpu, accuracy = timed_run(side, case, seed, env)
                    if round_ < 0:
                        continue
                    side.seconds[case].append(wall)
                    side.cpu[case].append(cpu)
                    if accuracy is not None:
                        side.accuracies.append(accuracy)
                    print(f"  {case} round {round_} {side.name}: {wall:.2f} s wall, {cpu:.2f} s CPU"
                          + (f", class-IL {accuracy:.2f}%" if accuracy is not None else ""), flush=True)

    print(f"\n{cli.repeats} rounds per case (seeds 0..{cli.repeats - 1} in the run case), "
          f"{cli.warmup} untimed warm-up round(s); ratio = median ours / median Mammoth wall time\n")
    print(table(cases, ours, mammoth))
    print(f"\nload average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
