"""Run for run against Mammoth: every shared method, whole runs, this program fed Mammoth's draws.

    .venv/bin/python benchmarks/mammoth_runs.py --seeds 4 --jobs 2                 # every method below
    .venv/bin/python benchmarks/mammoth_runs.py --models er,derpp --seeds 8
    .venv/bin/python benchmarks/mammoth_runs.py reference   # writes tests/fixtures/mammoth_runs.json

Both programs read the same MNIST-format files (scikit-learn's digits upsampled to 28x28,
`benchmarks/startup.py`'s writer; 1438 training and 359 test images), seq-mnist's five tasks, the MLP
784-100-100-10, 1 epoch, batch 10, lr 0.1, plain SGD, buffer 200, replay minibatch 10, on the CPU with
two threads (Mammoth's main.py sets `torch.set_num_threads(2)`; at one thread the matrix products
round differently in the last bit). Mammoth's own main.py (aimagelab/mammoth at e75a491) runs against
this program's main.py started through `benchmarks/mammoth_draws.py`, which replaces the stream order,
the reservoir's slots and the replay batches with the draws Mammoth makes. Where a method's behaviour
differs by design (the paper against Mammoth), ours runs with the flag that gives Mammoth's
(`MAMMOTH_FLAGS`).

A run is identical when the two accuracy matrices (every seen task's class-IL and task-IL accuracy
after every task, 2 decimals) are equal. The table gives, per method, how many seeds were identical,
the final class-IL accuracy (task-IL for pnn, which is task-incremental only) averaged over the five
tasks, mean ± std over seeds on each side, and Welch's two-sided p. lucir is not compared: Mammoth's
calls `torch.cuda.synchronize()` in its finetuning, so it does not run on a CPU. Each run's
matrices are appended to a JSON-lines file, so an interrupted comparison resumes.

`reference`: Mammoth's runs of the methods in `IDENTICAL` on a small scenario (the first 1000 training
and 200 test images of the same files, seed 0), with the loss of every step
(`benchmarks/mammoth_trace.py`) and the accuracy matrices, written where tests/test_mammoth_runs.py
reads them; the test runs this program on the same files through `mammoth_draws` and compares.
"""
from __future__ import annotations

import os

ENVIRONMENT = dict(os.environ)

import argparse  # noqa: E402
import ast  # noqa: E402
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
from benchmarks.mammoth_parity import welch_p  # noqa: E402
from benchmarks.startup import ensure_clip_cache, write_digits_as_mnist  # noqa: E402

COMMON = ["--dataset", "seq-mnist", "--lr", "0.1", "--batch_size", "10", "--n_epochs", "1"]
REPLAY = ["--buffer_size", "200", "--minibatch_size", "10"]
# method: flags both programs take (beyond COMMON), in Mammoth's spelling, which this program shares
METHODS = {
    "sgd": [],
    "er": REPLAY,
    "der": REPLAY + ["--alpha", "0.3"],
    "derpp": REPLAY + ["--alpha", "0.3", "--beta", "0.5"],
    "er_ace": REPLAY,
    "agem": REPLAY,
    "lwf": ["--alpha", "0.5", "--softmax_temp", "2"],
    "ewc_on": ["--e_lambda", "90", "--gamma", "1"],
    "si": ["--c", "1", "--xi", "0.9"],
    "icarl": REPLAY,
    "bic": REPLAY + ["--bic_epochs", "50"],
    "gdumb": REPLAY + ["--fitting_epochs", "16", "--cutmix_alpha", "1.0"],
    "gem": REPLAY + ["--gamma", "0.5"],
    "gss": REPLAY + ["--batch_num", "1", "--gss_minibatch_size", "10"],
    "hal": REPLAY + ["--hal_lambda", "0.1", "--beta", "0.5", "--gamma", "0.1"],
    "fdr": REPLAY + ["--alpha", "1.0"],  # Mammoth ignores --alpha (its weight is 1)
    "rpc": REPLAY,
    "pnn": [],
}
# method: this program's flags that choose Mammoth's behaviour where it differs from the paper
MAMMOTH_FLAGS = {
    "agem": ["--agem_memory", "batch"],
    "icarl": ["--class_mean_flip", "always"],
    "bic": ["--bic_lambda", "mammoth"],
    "gdumb": ["--gdumb_sampler", "reservoir", "--fit_after", "last_task"],
    "rpc": ["--loss_on_polytope", "0"],
}
SCENARIO = {"n_train": 1000, "n_test": 200, "seed": 0}
REFERENCE = REPO / "tests" / "fixtures" / "mammoth_runs.json"
# the methods whose runs came out identical to Mammoth's over seeds (benchmarks/README.md's table)
IDENTICAL = ("sgd", "er", "der", "derpp", "er_ace", "agem", "si", "gss", "icarl")
# row: (method, this program's extra flags), for runs that isolate a difference
VARIANTS: dict[str, tuple[str, list[str]]] = {}
DIVERGED = {"mammoth": "assert not torch.isnan(loss)", "ours": "the training loss became "}
MAMMOTH_RAW = re.compile(r"Raw accuracy values: Class-IL (\[[^\]]*\]) \| Task-IL (\[[^\]]*\])")
OURS_ROW = re.compile(r"^after (\d+)((?:\s+[0-9.]+)+)\s*$", re.MULTILINE)


def mammoth_matrices(stdout: str) -> list[list[list[float]]] | None:
    """[class-IL rows, task-IL rows] from Mammoth's 'Raw accuracy values' lines (printed twice: stderr and log)."""
    rows = {}
    for class_il, task_il in MAMMOTH_RAW.findall(stdout):
        values = [ast.literal_eval(class_il), ast.literal_eval(task_il)]
        rows[len(values[0])] = [[round(v, 2) for v in setting] for setting in values]
    if not rows:
        return None
    return [[rows[t][s] for t in sorted(rows)] for s in (0, 1)]


def ours_matrices(stdout: str) -> list[list[list[float]]] | None:
    """[class-IL rows, task-IL rows] from main.py's two accuracy tables."""
    tables = stdout.split("task-il accuracy (%)")
    if len(tables) != 2:
        return None
    return [[[float(v) for v in row.split()] for _, row in OURS_ROW.findall(part)] for part in tables]


def command(side: str, row: str, seed: int, data: Path, store: Path, cli) -> tuple[list[str], Path]:
    model, extra = VARIANTS.get(row, (row, MAMMOTH_FLAGS.get(row, [])))
    flags = ["--model", model, *COMMON, *METHODS[model], "--seed", str(seed)]
    if side == "mammoth":
        return ([cli.mammoth_python, "main.py", *flags, "--backbone", "mnistmlp", "--base_path", f"{data}/",
                 "--non_verbose", "1", "--num_workers", "0"], cli.mammoth)
    return ([sys.executable, str(REPO / "benchmarks" / "mammoth_draws.py"), *flags, *extra,
             "--backbone", "mlp", "--mlp_hidden", "100,100", "--data_path", str(data), "--device", "cpu",
             "--num_threads", "2", "--non_verbose", "--tracking_uri",
             f"sqlite:///{store}/ours-{model}-{len(extra)}-{seed}.db"],
            REPO)


def run_one(side: str, model: str, seed: int, data: Path, store: Path, cli, env: dict[str, str]) -> dict:
    argv, cwd = command(side, model, seed, data, store, cli)
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    matrices = (mammoth_matrices if side == "mammoth" else ours_matrices)(done.stdout)
    if done.returncode != 0 and DIVERGED[side] in done.stdout:  # a NaN loss: Mammoth asserts, ours ends the run
        return {"side": side, "model": model, "seed": seed, "matrices": None}
    if done.returncode != 0 or matrices is None:
        sys.exit(f"{side} {model} seed {seed} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}")
    return {"side": side, "model": model, "seed": seed, "matrices": matrices}


def final_class_il(record: dict) -> float:
    return statistics.mean(record["matrices"][0][-1])


def final_task_il(record: dict) -> float:
    return statistics.mean(record["matrices"][1][-1])


def table(records: list[dict], models: list[str], seeds: list[int]) -> str:
    by = {(r["side"], r["model"], r["seed"]): r for r in records}
    lines = ["| method | identical runs | setting | Mammoth | ours | p (Welch) |", "|---|---|---|---|---|---|"]
    for model in models:
        pairs = [(by[("mammoth", model, s)], by[("ours", model, s)]) for s in seeds
                 if ("mammoth", model, s) in by and ("ours", model, s) in by]
        diverged = sum(m["matrices"] is None and o["matrices"] is None for m, o in pairs)
        one_side = sum((m["matrices"] is None) != (o["matrices"] is None) for m, o in pairs)
        pairs = [(m, o) for m, o in pairs if m["matrices"] is not None and o["matrices"] is not None]
        if not pairs:
            continue
        same = sum(m["matrices"] == o["matrices"] for m, o in pairs)
        final, setting = (final_task_il, "task-IL") if model == "pnn" else (final_class_il, "class-IL")
        theirs, ours = [final(m) for m, _ in pairs], [final(o) for _, o in pairs]
        spread = (lambda v: f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}") if len(pairs) > 1 else \
            (lambda v: f"{v[0]:.1f}")
        p = f"{welch_p(ours, theirs):.2f}" if len(pairs) > 1 and theirs != ours else "–"
        lines.append(f"| {model} {' '.join(MAMMOTH_FLAGS.get(model, []))} | {same} of {len(pairs)}"
                     f"{f' (and {diverged} diverged on both sides)' if diverged else ''}"
                     f"{f' ({one_side} diverged on one side only)' if one_side else ''} | {setting} | "
                     f"{spread(theirs)} | {spread(ours)} | {p} |")
    return "\n".join(lines)


def reference(cli, env: dict[str, str]) -> None:
    """Mammoth's traces of the scenario, one process per method, into REFERENCE."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="mammoth-reference-") as scratch:
        data = Path(scratch)
        write_digits_as_mnist(data, SCENARIO["n_train"], SCENARIO["n_test"])
        for model in cli.models.split(","):
            argv, _ = command("mammoth", model, SCENARIO["seed"], data, data, cli)
            argv = [cli.mammoth_python, str(REPO / "benchmarks" / "mammoth_trace.py"), "--mammoth", str(cli.mammoth),
                    "--", *argv[2:]]
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace")
            traces = [line[len("TRACE "):] for line in done.stdout.splitlines() if line.startswith("TRACE ")]
            matrices = mammoth_matrices(done.stdout)
            if done.returncode != 0 or not traces or matrices is None:
                sys.exit(f"mammoth {model} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}")
            method, extra = VARIANTS.get(model, (model, MAMMOTH_FLAGS.get(model, [])))
            results[model] = {"model": method, "flags": METHODS[method], "ours": extra,
                              "losses": json.loads(traces[-1])["losses"], "matrices": matrices}
            print(f"  {model}: {len(results[model]['losses'])} steps, final class-IL "
                  f"{statistics.mean(matrices[0][-1]):.2f}", flush=True)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps({"mammoth": "aimagelab/mammoth e75a491", **SCENARIO, "common": COMMON,
                                     "methods": results}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("compare", "reference"), default="compare")
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"), help="Mammoth's work tree")
    parser.add_argument("--mammoth_python", default="/work/mammoth-venv/bin/python",
                        help="the interpreter of a venv with Mammoth's requirements")
    parser.add_argument("--models", default=None, help="methods to compare (reference: default IDENTICAL)")
    parser.add_argument("--seeds", type=int, default=4, help="how many seeds")
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mammoth_runs.jsonl"),
                        help="JSON-lines file of per-run accuracy matrices (appended to, read back)")
    cli = parser.parse_args()
    cli.models = cli.models or ",".join(IDENTICAL if cli.mode == "reference" else [*METHODS, *VARIANTS])
    models = cli.models.split(",")
    unknown = sorted(set(models) - set(METHODS) - set(VARIANTS))
    if unknown:
        sys.exit(f"no comparison is set up for {', '.join(unknown)}; pick from {', '.join([*METHODS, *VARIANTS])}")
    seeds = list(range(cli.first_seed, cli.first_seed + cli.seeds))
    env = {k: v for k, v in ENVIRONMENT.items() if k not in ("PYTHONPATH", "WANDB_ENTITY", "WANDB_PROJECT")}
    env.update({"HF_HUB_OFFLINE": "1"})
    print(f"machine: {machine()}; load average (1, 5, 15 min) {load_average()}", flush=True)
    print(ensure_clip_cache(cli.mammoth, cli.mammoth_python, env))
    if cli.mode == "reference":
        return reference(cli, env)
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["side"], r["model"], r["seed"]) for r in records}
    todo = [(side, model, seed) for model in models for seed in seeds for side in ("mammoth", "ours")
            if (side, model, seed) not in done]
    print(f"{len(records)} runs already in {out}; {len(todo)} to run, {cli.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory(prefix="mammoth-runs-") as scratch, out.open("a") as sink:
        data = Path(scratch) / "data"
        write_digits_as_mnist(data)
        with ThreadPoolExecutor(cli.jobs) as pool:
            for record in pool.map(lambda job: run_one(*job, data, Path(scratch), cli, env), todo):
                outcome = "diverged" if record["matrices"] is None else f"final class-IL {final_class_il(record):.2f}"
                print(f"  {record['side']} {record['model']} seed {record['seed']}: {outcome}", flush=True)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                records.append(record)
    print(table(records, models, seeds))
    print(f"load average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
