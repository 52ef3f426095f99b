"""Parity with Mammoth on seq-mnist's MLP: step by step in one process, and over seeds end to end.

Both sides read the same MNIST-format files: scikit-learn's 8x8 digits upsampled to 28x28 and
written as MNIST's idx files (`benchmarks/startup.py`'s writer), 1438 training and 359 test images.

    .venv/bin/python benchmarks/mammoth_parity.py lockstep    # about 1 minute
    .venv/bin/python benchmarks/mammoth_parity.py seeds --seeds 8 --jobs 2
    .venv/bin/python benchmarks/mammoth_parity.py reference   # the numbers tests/test_mammoth_parity.py pins

lockstep: `benchmarks/mammoth_parity_lockstep.py`, run with Mammoth's interpreter, trains Mammoth's
sgd, er, der and derpp and ours side by side from the same weights on the same batches with the
same buffer draws, and compares losses, gradients, weights and buffers after every step.

seeds: Mammoth's `main.py` against ours, one fresh process per run (1 epoch, batch 10, replay
minibatch 10, lr 0.1, buffer 200, DER++ alpha 0.3 beta 0.5, MLP 784-100-100-10, CPU), for the
models and seeds asked; ours both with seq-mnist's default initialisation (--mlp_init xavier,
Mammoth's) and with --mlp_init torch (this repository's initialisation before it followed
Mammoth's). Each run's final class-IL and task-IL accuracy (mean over the 5 tasks after the last)
is appended to a JSON-lines file, so an interrupted comparison resumes; the table gives
mean ± std (n-1) per side and Welch's two-sided p against Mammoth.
"""
from __future__ import annotations

import os

ENVIRONMENT = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.engine_throughput import load_average, machine  # noqa: E402
from benchmarks.startup import ensure_clip_cache, write_digits_as_mnist  # noqa: E402

MODELS = ("sgd", "er", "derpp")
SIDES = ("mammoth", "ours", "ours_torch")
SIDE_NAMES = {"mammoth": "Mammoth", "ours": "ours (xavier, the default)", "ours_torch": "ours --mlp_init torch"}
COMMON = {"lr": "0.1", "batch_size": "10", "n_epochs": "1"}
REPLAY = {"buffer_size": "200", "minibatch_size": "10"}
DERPP = {"alpha": "0.3", "beta": "0.5"}
OURS_ACCURACY = re.compile(r"^acc_(class|task)_il: ([0-9.]+)", re.MULTILINE)
MAMMOTH_ACCURACY = re.compile(r"Accuracy for 5 task\(s\):\s+\[Class-IL\]: ([0-9.]+) %\s+\[Task-IL\]: ([0-9.]+) %")


def flags(model: str) -> list[str]:
    values = dict(COMMON)
    if model != "sgd":
        values.update(REPLAY)
    if model == "derpp":
        values.update(DERPP)
    return [token for key, value in values.items() for token in (f"--{key}", value)]


def command(side: str, model: str, seed: int, data: Path, store: Path, cli: argparse.Namespace) -> tuple[list[str], Path]:
    """The argv and working directory of one run."""
    if side == "mammoth":
        return ([cli.mammoth_python, "main.py", "--model", model, "--dataset", "seq-mnist", "--backbone", "mnistmlp",
                 *flags(model), "--seed", str(seed), "--base_path", f"{data}/", "--non_verbose", "1",
                 "--num_workers", str(cli.mammoth_num_workers)], cli.mammoth)
    init = ["--mlp_init", "torch"] if side == "ours_torch" else []
    return ([sys.executable, "main.py", "--model", model, "--dataset", "seq-mnist", "--backbone", "mlp",
             "--mlp_hidden", "100,100", *init, *flags(model), "--seed", str(seed), "--data_path", str(data),
             "--tracking_uri", f"sqlite:///{store}/mlflow-{side}-{model}-{seed}.db", "--device", "cpu",
             "--num_threads", "1", "--non_verbose"], REPO)


def run_one(side: str, model: str, seed: int, data: Path, store: Path, cli: argparse.Namespace,
            env: dict[str, str]) -> dict:
    argv, cwd = command(side, model, seed, data, store, cli)
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    if side == "mammoth":
        found = MAMMOTH_ACCURACY.findall(done.stdout)
        accuracy = {"class_il": float(found[-1][0]), "task_il": float(found[-1][1])} if found else None
    else:
        found = dict(OURS_ACCURACY.findall(done.stdout))
        accuracy = {f"{k}_il": float(v) for k, v in found.items()} if len(found) == 2 else None
    if done.returncode != 0 or accuracy is None:
        sys.exit(f"{side} {model} seed {seed} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}")
    return {"side": side, "model": model, "seed": seed, **accuracy}


def welch_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def seeds_table(records: list[dict], models: list[str], sides: list[str]) -> str:
    lines = []
    for setting in ("class_il", "task_il"):
        lines += [f"\n{setting.replace('_', '-')} accuracy (%), mean ± std over seeds; Welch p against Mammoth",
                  f"{'model':<7}" + "".join(f"{SIDE_NAMES[s]:>34}" for s in sides)]
        for model in models:
            cells = []
            reference = [r[setting] for r in records if r["side"] == "mammoth" and r["model"] == model]
            for side in sides:
                values = [r[setting] for r in records if r["side"] == side and r["model"] == model]
                if len(values) < 2:
                    cells.append(f"{'-':>34}")
                    continue
                cell = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"
                if side != "mammoth" and len(reference) >= 2:
                    cell += f", p {welch_p(values, reference):.2f}"
                cells.append(f"{cell:>34}")
            lines.append(f"{model:<7}" + "".join(cells))
    return "\n".join(lines)


def seeds(cli: argparse.Namespace, data: Path, scratch: Path) -> None:
    env = {k: v for k, v in ENVIRONMENT.items() if k not in ("PYTHONPATH", "WANDB_ENTITY", "WANDB_PROJECT")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    models, sides = cli.models.split(","), cli.sides.split(",")
    print(ensure_clip_cache(cli.mammoth, cli.mammoth_python, env))
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["side"], r["model"], r["seed"]) for r in records}
    todo = [(side, model, seed) for seed in range(cli.first_seed, cli.first_seed + cli.seeds) for model in models
            for side in sides if (side, model, seed) not in done]
    print(f"{len(records)} runs already in {out}; {len(todo)} to run, {cli.jobs} at a time", flush=True)
    with ThreadPoolExecutor(cli.jobs) as pool, out.open("a") as sink:
        for record in pool.map(lambda job: run_one(*job, data, scratch, cli, env), todo):
            print(f"  {record}", flush=True)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
    wanted = set(range(cli.first_seed, cli.first_seed + cli.seeds))
    print(seeds_table([r for r in records if r["seed"] in wanted], models, sides))


def child(cli: argparse.Namespace, mode: str, *extra: str) -> list | dict:
    """Run mammoth_parity_lockstep.py with Mammoth's interpreter; its result."""
    env = {k: v for k, v in ENVIRONMENT.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    argv = [cli.mammoth_python, str(REPO / "benchmarks" / "mammoth_parity_lockstep.py"), mode,
            "--mammoth", str(cli.mammoth), *extra]
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        sys.exit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    return json.loads(results[-1])


def lockstep(cli: argparse.Namespace, data: Path) -> None:
    results = child(cli, "lockstep", "--data_path", str(data), "--models", cli.lockstep_models,
                    "--seed", str(cli.first_seed), "--tasks", str(cli.tasks))
    for r in results:
        print(f"\n{r['model']}: {r['steps']} steps over {cli.tasks} tasks; Mammoth's initial weights at seed "
              f"{cli.first_seed} {'equal' if r['own_init_equal'] else 'differ from'} ours at that seed; inputs and "
              f"labels {'equal' if r['inputs_equal'] else 'DIFFER'}; every recorded draw replayed: {r['draws_replayed']}")
        gap = max(abs(a - b) for after in r["accuracy"] for m, o in zip(after["mammoth"], after["ours"])
                  for a, b in zip(m, o))
        final = r["accuracy"][-1]
        print(f"  each side's own evaluation after every task (class-IL, task-IL of every seen task): largest "
              f"difference {gap:.2g} points; after the last task class-IL {sum(final['ours'][0]) / len(final['ours'][0]):.2f}"
              f" (ours) and {sum(final['mammoth'][0]) / len(final['mammoth'][0]):.2f} (Mammoth)")
        if r["first_difference"] is None:
            print("  bit-identical at every step: loss, every gradient, every weight, the buffer")
            continue
        step, task, what = r["first_difference"]
        print(f"  first difference at step {step} (task {task}): " + ", ".join(f"{k} {v:.3g}" for k, v in what.items()))
        print("  largest difference over all steps: " + ", ".join(f"{k} {v:.3g}" for k, v in r["worst"].items() if v)
              + "; every other quantity bit-identical at every step")


def reference(cli: argparse.Namespace) -> None:
    result = child(cli, "reference")
    print(f"MAMMOTH_LOSSES = {result['losses']!r}")
    print("MAMMOTH_WEIGHTS = {  # name: [sum, sum of squares, first entry]")
    for name, values in result["weights"].items():
        print(f"    {name!r}: {values!r},")
    print("}")
    print(f"MAMMOTH_BUFFER_LOGITS = {result['buffer_logits']['logits']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mode", choices=("lockstep", "seeds", "reference"))
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"), help="Mammoth's work tree")
    parser.add_argument("--mammoth_python", default="/work/mammoth-venv/bin/python",
                        help="the interpreter of a venv with Mammoth's requirements")
    parser.add_argument("--mammoth_num_workers", type=int, default=0,
                        help="Mammoth's --num_workers (its data loader's processes; the batches do not depend on it)")
    parser.add_argument("--models", default=",".join(MODELS), help="seeds: models to compare")
    parser.add_argument("--lockstep_models", default="derpp,er,der,sgd", help="lockstep: models to compare")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"seeds: of {', '.join(SIDES)}")
    parser.add_argument("--seeds", type=int, default=8, help="seeds: how many seeds")
    parser.add_argument("--first_seed", type=int, default=0, help="first seed (lockstep: the seed)")
    parser.add_argument("--tasks", type=int, default=5, help="lockstep: tasks to run, each a whole epoch")
    parser.add_argument("--jobs", type=int, default=2, help="seeds: runs at a time")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mammoth_parity.jsonl"),
                        help="seeds: JSON-lines file of per-run accuracies (appended to, read back)")
    cli = parser.parse_args()
    print(f"machine: {machine()}; load average (1, 5, 15 min) {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mammoth-parity-") as scratch:
        data = Path(scratch) / "data"
        if cli.mode != "reference":
            n_train, n_test = write_digits_as_mnist(data)
            print(f"data: scikit-learn digits upsampled to 28x28 as MNIST idx files, {n_train} train / {n_test} test")
        {"lockstep": lambda: lockstep(cli, data), "seeds": lambda: seeds(cli, data, Path(scratch)),
         "reference": lambda: reference(cli)}[cli.mode]()
    print(f"load average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
