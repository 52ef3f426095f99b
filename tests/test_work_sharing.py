"""Several train_splits.py drivers on one store share its groups through claim files; a driver that dies
leaves claims and an MLflow run that the next driver takes over."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

import train_splits
from memorization.driver import run_plan
from memorization.store import SubsetStore
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real processes, clusters or servers: run by CI, not by `-m "not slow"`

PLAN = ["--dataset", "seq-digits", "--n_models", "8", "--n_epochs", "60", "--lr", "0.1", "--batch_size", "64",
        "--mlp_hidden", "256", "--non_verbose"]


def command(store, tracking_uri, *extra):
    return [sys.executable, "train_splits.py", *PLAN, "--out", str(store), "--tracking_uri", tracking_uri, *extra]


def test_two_drivers_on_one_store_train_each_model_once(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    drivers = [subprocess.Popen(command(store, f"sqlite:///{tmp_path / f'{i}.db'}"), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    assert all(driver.returncode == 0 for driver in drivers), outputs
    trained = [int(re.search(r"trained (\d+) models", out).group(1)) for out in outputs]
    assert sum(trained) == 8 and min(trained) >= 1, trained  # every model once, and both drivers worked
    plan = SubsetStore(store).load_plan()
    assert SubsetStore(store).finished_models(plan)[0] == list(range(8))
    assert list((store / "claims").iterdir()) == []  # every claim released


def claim_file(store, group: int, plan_hash: str, age: float):
    path = store / "claims" / f"group_{group:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"plan_hash": plan_hash, "driver": "elsewhere:1:dead", "time": 0}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def plan_hash(argv) -> str:
    from memorization.driver import make_plan

    return make_plan(train_splits.parse_args(argv)).hash


def test_a_stale_claim_is_taken_over_and_a_live_one_is_left_alone(tmp_path):
    store = tmp_path / "store"
    argv = [*PLAN, "--n_epochs", "2", "--out", str(store), "--claim_timeout", "60",
            "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"]
    digest = plan_hash(argv)
    claim_file(store, 0, digest, age=1000)  # its driver stopped touching it long ago
    live = claim_file(store, 1, digest, age=0)
    result = run_plan(train_splits.parse_args(argv))
    assert result["trained"] == 7 and result["elsewhere"] == 1
    assert SubsetStore(store).stored_models() == {0, 2, 3, 4, 5, 6, 7}
    assert live.exists()  # still the other driver's


def test_a_claim_of_another_plan_is_refused_and_nothing_is_lost(tmp_path, capsys):
    store = tmp_path / "store"
    argv = [*PLAN, "--n_epochs", "2", "--out", str(store), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"]
    run_plan(train_splits.parse_args([*argv, "--n_models", "4"]))
    (store / "models" / "model_000003.npz").unlink()
    before = {p.name: p.read_bytes() for p in (store / "models").iterdir()}
    claim_file(store, 3, "0123456789abcdef", age=0)
    capsys.readouterr()
    assert train_splits.main([*argv, "--n_models", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: \S+group_000003\.json claims a group for another plan \(0123456789abcdef\); this "
                        r"store's plan is \w+: remove \S+claims if no driver of that plan runs", err), err
    assert {p.name: p.read_bytes() for p in (store / "models").iterdir()} == before


def test_a_claims_folder_that_cannot_be_written_is_one_sentence(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    (store / "claims").write_text("not a folder")
    code = train_splits.main([*PLAN, "--out", str(store), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write claims into {store / 'claims'} (") and len(err.splitlines()) == 1


def test_a_driver_killed_with_sigkill_is_continued_in_the_same_mlflow_run(tmp_path):
    store, tracking_uri = tmp_path / "store", f"sqlite:///{tmp_path / 'm.db'}"
    process = subprocess.Popen(command(store, tracking_uri, "--claim_timeout", "2"), cwd=REPO_ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((store / "models").glob("model_*.npz")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1 <= len(SubsetStore(store).stored_models()) < 8, "the driver was not killed midway"
    time.sleep(2.5)  # its claims and its run record go stale
    result = run_plan(train_splits.parse_args([*PLAN, "--out", str(store), "--claim_timeout", "2",
                                               "--tracking_uri", tracking_uri]))
    assert result["elsewhere"] == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("split-training").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["models_stored"] == 8
    assert run.data.metrics["hours_left"] == 0
    assert list((store / "drivers").iterdir()) == []


@pytest.mark.parametrize("argv, sentence", [(["--claim_timeout", "0"], "--claim_timeout must be positive, got 0.0")])
def test_bad_sharing_flags_end_with_one_sentence(tmp_path, capsys, argv, sentence):
    assert train_splits.main([*PLAN, "--out", str(tmp_path / "s"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {sentence}"


def test_a_driver_killed_while_claiming_leaves_no_claim_that_blocks_the_group(tmp_path, monkeypatch):
    """A claim appears with its content or not at all: killed after writing it under its own name and before
    linking it to the claim's name, a driver leaves the group free; a claim it made is whole at once."""
    from utils import claims as claims_module

    first, second = (claims_module.Claims(tmp_path, "plan", timeout=300) for _ in range(2))
    link = os.link

    def killed(source, target):
        raise KeyboardInterrupt  # as SIGKILL would stop the driver here

    monkeypatch.setattr(claims_module.os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        first.claim(3)
    assert not first.path(3).exists()
    seen = []

    def linked(source, target):  # what another driver sees the moment the claim's name exists
        link(source, target)
        seen.append(json.loads(open(target).read()))

    monkeypatch.setattr(claims_module.os, "link", linked)
    assert second.claim(3) and not first.claim(3)
    assert seen == [{"plan_hash": "plan", "driver": second.driver, "time": seen[0]["time"]}]
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["group_000003.json"]
    first.close()
    second.close()
