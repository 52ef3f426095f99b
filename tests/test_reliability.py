"""The reliability battery: every bad input ends with exit 2 and one sentence, nothing written before is
touched, two runs started at once on a new store both land, and Ctrl-C or SIGTERM marks a run KILLED that the
printed command then continues."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real processes, clusters or servers: run by CI, not by `-m "not slow"`

OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
DIGITS = ["--dataset", "seq-digits", "--n_epochs", "1", "--non_verbose"]
SPLITS = ["--n_models", "2", "--n_epochs", "1", "--lr", "0.1", "--mlp_hidden", "16", "--non_verbose"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(script: str, *argv: str, env: dict | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_sentence(result: subprocess.CompletedProcess, sentence: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and sentence in lines[0], result.stderr


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """Results already on disk that no bad input may touch: a checkpoint, a score file, a store, a sweep."""
    folder = tmp_path_factory.mktemp("existing")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert run("main.py", *DIGITS, "--model", "sgd", "--lr", "0.1", "--savecheck", "--checkpoint_dir",
               str(folder / "checkpoints"), "--tracking_uri", uri).returncode == 0
    assert run("train_splits.py", *SPLITS, "--out", str(folder / "store"), "--tracking_uri", uri).returncode == 0
    (folder / "garbage.pt").write_bytes(b"hello world" * 10)
    np.save(folder / "strings.npy", np.array(["x"] * 1438))
    np.save(folder / "scores.npy", np.zeros(1438, np.float32))
    (folder / "scores.json").write_text("{not json")
    np.save(folder / "listed.npy", np.zeros(1438, np.float32))
    (folder / "listed.json").write_text("[1, 2]")
    broken = folder / "broken_store"
    broken.mkdir()
    for name in ("plan_arrays.npz", "noisy_mask.npy", "input_noise_mask.npy"):
        (broken / name).write_bytes((folder / "store" / name).read_bytes())
    (broken / "plan.json").write_text((folder / "store" / "plan.json").read_text()[:40])
    return folder, snapshot(folder)


MAIN_CASES = [
    (["--resume", "{dir}/garbage.pt"], "is corrupt or not a checkpoint of this framework"),
    (["--mem_scores", "{dir}/strings.npy"], "holds <U1 values, not numbers"),
    (["--mem_scores", "{dir}/scores.npy"], "of --mem_scores is not readable JSON"),
    (["--mem_scores", "{dir}/listed.npy"], "of --mem_scores is a list, not the mapping"),
    (["--optim_mom", "-1"], "--optim_mom must be in [0, inf), got -1.0"),
    (["--lr", "inf"], "--lr must be in (0, inf), got inf"),
    (["--dataset", "seq-mnist", "--download", "--data_path", "{dir}/offline"], "downloading MNIST failed"),
]


# The bad inputs of one script run in one interpreter, each through the script's main() as its __main__ calls it
# (exit status, stderr, and the folder's digest after the case are recorded); main.py's first case also runs as a
# process of its own, so that the whole path to the exit status is exercised too (the scripts share it:
# utils/errors.run_command).
BATCH = """
import contextlib, hashlib, io, json, pathlib, sys
import {script} as script

def digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in pathlib.Path(folder).rglob("*") if p.is_file()):
        h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()

folder, cases = sys.argv[1], json.loads(sys.argv[2])
results = []
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = script.main(argv)
    results.append({{"returncode": code, "stderr": err.getvalue(), "digest": digest(folder)}})
print("RESULTS " + json.dumps(results))
"""


def digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()


def batch(script: str, folder: Path, cases: list[list[str]]) -> tuple[list[subprocess.CompletedProcess], list[str]]:
    """Every case of `script` in one interpreter: how each ended, and the folder's digest after each."""
    import json

    result = subprocess.run([sys.executable, "-c", BATCH.format(script=script), str(folder), json.dumps(cases)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")][-1]
    ended = json.loads(line[len("RESULTS "):])
    return ([subprocess.CompletedProcess(case, e["returncode"], "", e["stderr"]) for case, e in zip(cases, ended)],
            [e["digest"] for e in ended])


def main_argv(folder: Path, argv: list[str]) -> list[str]:
    argv = [a.format(dir=folder) for a in argv]
    lr = [] if "--lr" in argv else ["--lr", "0.1"]
    return [*DIGITS, "--model", "sgd", *lr, *argv, "--tracking_uri", f"sqlite:///{folder / 'mlflow.db'}"]


def splits_argv(folder: Path, argv: list[str]) -> list[str]:
    return [*SPLITS, *[a.format(dir=folder) for a in argv], "--tracking_uri", f"sqlite:///{folder / 'mlflow.db'}"]


SPLITS_CASES = [
    (["--out", "{dir}/broken_store"], "are damaged; the model files are kept"),
    (["--out", "{dir}/store", "--optim_mom", "-1"], "--optim_mom must be a finite number ≥ 0"),
    (["--out", "{dir}/store", "--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--out", "{dir}/store", "--n_models", "3"], "already holds another subset-training plan"),
]
EVAL_CASES = [
    (["--run_dir", "{dir}/broken_store"], "are damaged; the model files are kept"),
    (["--run_dir", "{dir}/store", "--tracking_uri", "http://127.0.0.1:9"], "is unreachable"),
    (["--run_dir", "{dir}/nothing"], "holds neither a train_splits.py store"),
]


def eval_argv(folder: Path, argv: list[str]) -> list[str]:
    argv = [a.format(dir=folder) for a in argv]
    uri = [] if "--tracking_uri" in argv else ["--tracking_uri", f"sqlite:///{folder / 'mlflow.db'}"]
    return [*argv, "--out", str(folder / "eval_out" / "scores.npy"), *uri]  # inside: writing it changes the digest


@pytest.fixture(scope="module")
def batches(existing):
    folder, _ = existing
    before = digest(folder)
    ran = {}
    for script, cases, make in (("main", MAIN_CASES, main_argv), ("train_splits", SPLITS_CASES, splits_argv),
                                ("eval_splits", EVAL_CASES, eval_argv)):
        ran[script] = batch(script, folder, [make(folder, argv) for argv, _ in cases])
    return before, ran


@pytest.mark.parametrize("script, cases, make", [("main", MAIN_CASES, main_argv)], ids=["main.py"])
def test_bad_input_ends_a_real_process_with_one_sentence(existing, script, cases, make):
    folder, before = existing
    argv, sentence = cases[0]
    assert_one_sentence(run(f"{script}.py", *make(folder, argv), env=OFFLINE), sentence)
    assert snapshot(folder) == before


@pytest.mark.parametrize("script, index", [("main", i) for i in range(len(MAIN_CASES))]
                         + [("train_splits", i) for i in range(len(SPLITS_CASES))]
                         + [("eval_splits", i) for i in range(len(EVAL_CASES))])
def test_bad_input_ends_with_one_sentence_and_touches_nothing(batches, script, index):
    before, ran = batches
    cases = {"main": MAIN_CASES, "train_splits": SPLITS_CASES, "eval_splits": EVAL_CASES}[script]
    results, digests = ran[script]
    assert_one_sentence(results[index], cases[index][1])
    assert digests[index] == before  # nothing written before was touched, and nothing was added


def test_a_stray_file_in_the_models_folder_is_ignored(existing, tmp_path):
    folder, _ = existing
    store = tmp_path / "store"
    store.mkdir()
    for path in (folder / "store").rglob("*"):
        if path.is_file():
            (store / path.relative_to(folder / "store")).parent.mkdir(parents=True, exist_ok=True)
            (store / path.relative_to(folder / "store")).write_bytes(path.read_bytes())
    (store / "models" / "model_final.npz").write_bytes(b"not ours")
    result = run("eval_splits.py", "--run_dir", str(store), "--out", str(tmp_path / "s.npy"),
                 "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.returncode == 0, result.stderr
    assert len(np.load(tmp_path / "s.npy")) == 1438


SWEEP = {"base": {"dataset": "seq-digits", "model": "sgd", "n_epochs": 1, "mlp_hidden": 16},
         "methods": {"vanilla": {"grid": {"lr": [0.1]}}}, "selection": {"metric": "acc_class_il"},
         "search_seeds": [0], "final_seeds": [1]}


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/absolute", "it's", "a/b"])
def test_sweep_py_names_that_would_leave_the_folder_or_break_a_query(tmp_path, name):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": name, **SWEEP}))
    result = run("sweep.py", str(path), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert_one_sentence(result, "may hold only letters, digits, '_', '-' and '.'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_a_recorded_artifact_name_outside_its_run_is_refused(tmp_path):
    from utils.errors import ConfigError
    from utils.mlflow_logger import RunLogger

    logger = RunLogger(f"sqlite:///{tmp_path / 'm.db'}", "x")
    record = {"params": {}, "tags": {}, "metrics": [], "artifacts": {"../../outside.txt": b"x"}}
    with pytest.raises(ConfigError, match=r"is named '\.\./\.\./outside\.txt', which points outside its run"):
        logger.replay(record)
    assert not (tmp_path.parent / "outside.txt").exists()


def test_two_runs_started_at_once_on_a_new_store_both_land(tmp_path):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    processes = [subprocess.Popen([sys.executable, "main.py", *DIGITS, "--model", "er", "--buffer_size", "50",
                                   "--lr", "0.1", "--seed", str(seed), "--tracking_uri", uri], cwd=REPO_ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for seed in (3, 4)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["3", "4"]
    assert all(r.info.status == "FINISHED" and "acc_class_il" in r.data.metrics for r in runs)


def start_and_stop(command: list[str], ready, cwd=REPO_ROOT, stop=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start a process, send `stop` (SIGTERM, or SIGINT as Ctrl-C does) once `ready()` holds, and return how it
    ended."""
    # A shell starts background commands with SIGINT ignored, and a process keeps what it inherits (as it
    # should: Ctrl-C in a terminal is not meant for background jobs); this process is a foreground one.
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not ready() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, "", err)


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return found


# Ctrl-C here and for train_splits.py below, SIGTERM for sweep.py (the same handler; exit 130 against 143)
@pytest.mark.parametrize("stop, code, name", [(signal.SIGINT, 130, "Ctrl-C")])
def test_a_stopped_main_py_run_is_killed_and_the_printed_command_continues_it(tmp_path, stop, code, name):
    uri, checkpoints = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "checkpoints"
    argv = [*DIGITS[:-1], "--n_epochs", "20", "--model", "sgd", "--lr", "0.05", "--seed", "0", "--tracking_uri", uri,
            "--checkpoint_dir", str(checkpoints)]  # no --savecheck: the recovery checkpoint is enough
    stopped = start_and_stop([sys.executable, "main.py", *argv], lambda: any(checkpoints.glob("*.pt")), stop=stop)
    assert stopped.returncode == code and f"stopped by {name}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert only_run(uri, "continual-learning").info.status == "KILLED"
    (checkpoint,) = checkpoints.glob("*.pt")
    command = stopped.stderr.split("continue with:\n", 1)[1].strip()
    assert command == shlex.join([sys.executable, "main.py", *argv, "--resume", str(checkpoint)])
    assert subprocess.run(shlex.split(command), cwd=REPO_ROOT, capture_output=True, timeout=300).returncode == 0
    resumed = only_run(uri, "continual-learning")
    assert resumed.info.status == "FINISHED" and resumed.info.run_id == checkpoint.stem


def test_ctrl_c_marks_a_driver_killed_and_the_same_command_continues_its_run(tmp_path):
    uri, store = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "store"
    argv = [*SPLITS, "--n_models", "6", "--n_epochs", "200", "--mlp_hidden", "256", "--out", str(store),
            "--tracking_uri", uri]
    stopped = start_and_stop([sys.executable, "train_splits.py", *argv],
                             lambda: any((store / "models").glob("model_*.npz")), stop=signal.SIGINT)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().endswith("continue with the same command:\n  " + shlex.join(
        [sys.executable, "train_splits.py", *argv]))
    killed = only_run(uri, "split-training")
    assert killed.info.status == "KILLED"
    assert run("train_splits.py", *argv).returncode == 0
    finished = only_run(uri, "split-training")
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert finished.data.metrics["models_stored"] == 6


def test_sigterm_marks_a_sweep_killed_and_the_same_command_finishes_it(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "sigterm", **SWEEP, "search_seeds": [0, 1, 2], "final_seeds": [3]}))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    command = [sys.executable, str(REPO_ROOT / "sweep.py"), str(path), "--tracking_uri", uri,
               "--out", str(tmp_path / "out")]
    client = MlflowClient(uri)

    def a_cell_finished() -> bool:
        try:
            experiment = client.get_experiment_by_name("sigterm")
            return experiment is not None and bool(client.search_runs(
                [experiment.experiment_id], "tags.sweep_role = 'cell' and attributes.status = 'FINISHED'"))
        except Exception:  # noqa: BLE001  the store is being created
            return False

    stopped = start_and_stop(command, a_cell_finished)
    assert stopped.returncode == 143
    experiment = client.get_experiment_by_name("sigterm").experiment_id
    (parent,) = client.search_runs([experiment], "tags.sweep_role = 'parent'")
    assert parent.info.status == "KILLED"
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    (parent_again,) = client.search_runs([experiment], "tags.sweep_role = 'parent'")
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"


def test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_program(tmp_path):
    """Python prints and drops an exception raised inside a finalizer: a SIGTERM that came while the garbage
    collector ran one (a sweep's MLflow client, say) let the program run on and end with status 0."""
    script = tmp_path / "finalizer.py"
    script.write_text(f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
from utils.errors import run_command

class Closing:
    def __del__(self):  # the signal comes while this finalizer runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

def run(args):
    Closing()
    time.sleep(20)
    print("ran on")

sys.exit(run_command(run, lambda argv: None, []))
""")
    started = time.time()
    ended = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 143, ended.stderr
    assert "ran on" not in ended.stdout and "stopped by SIGTERM" in ended.stderr
    assert time.time() - started < 15


def test_a_sigterm_inside_a_store_write_stops_the_program_right_after_the_write():
    """A signal that landed in the middle of an MLflow transaction left its SQLite lock held, and the KILLED
    status written next failed; a write now finishes first, then the signal stops the program."""
    from utils.errors import Terminated, _terminate, deferred_termination

    previous = signal.signal(signal.SIGTERM, _terminate)
    written = []
    try:
        with pytest.raises(Terminated):
            with deferred_termination():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, and did not interrupt
                written.append("whole write")
        assert written == ["whole write"]
        with pytest.raises(Terminated):  # outside a write it stops at once, as before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
