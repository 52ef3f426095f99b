"""A subset-training store is taken over only when that is safe: one winner per stale claim, no takeover of a
store whose plan file is gone without an explicit flag, no process or file left behind by a killed driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import train_splits
from utils.claims import Claims
from memorization.store import SubsetStore
from tests.conftest import REPO_ROOT

ARGV = ["--dataset", "seq-digits", "--n_models", "2", "--n_epochs", "1", "--lr", "0.1", "--mlp_hidden", "16", "--seed", "0",
        "--non_verbose"]


def planted(path: Path, content: str = "", age: float = 1000.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_two_drivers_taking_over_one_stale_claim_cannot_both_win(tmp_path):
    claim = json.dumps({"plan_hash": "plan", "driver": "elsewhere:1:gone", "time": 0})
    planted(tmp_path / "claims" / "group_000000.json", claim)  # untouched for 1000 s: its driver is gone
    first, second = (Claims(tmp_path, "plan", timeout=60) for _ in range(2))
    judged, judge = threading.Event(), second._stale

    def slow_judge(path, content):  # the second driver has judged the claim stale, and is slow to act on it
        stale = judge(path, content)
        judged.set()
        time.sleep(0.5)
        return stale

    second._stale = slow_judge
    won = {}
    thread = threading.Thread(target=lambda: won.setdefault("second", second.claim(0)))
    thread.start()
    judged.wait(10)
    won["first"] = first.claim(0)  # takes the stale claim over meanwhile
    thread.join()
    assert won == {"first": True, "second": False}
    owner = json.loads(first.path(0).read_text())["driver"]
    assert owner == first.driver and sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["group_000000.json"]
    first.close()
    second.close()


def test_files_left_by_killed_drivers_are_removed_once_stale(tmp_path, capsys):
    store = tmp_path / "store"
    argv = [*ARGV, "--out", str(store), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--claim_timeout", "60"]
    assert train_splits.main(argv) == 0
    old = [planted(store / "models" / ".model_000001.npz.4242.tmp"),
           planted(store / "claims" / ".group_000001.json.host-4242-abcd"),
           planted(store / "claims" / "group_000001.json.stale-host-4242-abcd"),
           planted(store / "drivers" / "0123.adopted"),
           planted(store / ".plan.json.4242.tmp")]
    young = planted(store / "models" / ".model_000000.npz.4243.tmp", age=0)  # perhaps being written now
    kept = planted(store / "models" / "model_000001.corrupt-1700000000", age=1000)  # kept for inspection
    capsys.readouterr()
    assert train_splits.main(argv) == 0
    out = capsys.readouterr().out
    assert not any(path.exists() for path in old) and young.exists() and kept.exists()
    assert out.count("left by a driver that was killed") == len(old)


def test_a_store_whose_plan_file_is_gone_is_not_taken_over_by_another_command(tmp_path, capsys):
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'm.db'}"
    argv = [*ARGV, "--out", str(store), "--tracking_uri", uri]
    assert train_splits.main(argv) == 0
    (store / "plan.json").unlink()
    before = {p.name: p.read_bytes() for p in (store / "models").iterdir()}
    capsys.readouterr()
    assert train_splits.main([*argv, "--lr", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {store} has no plan.json but holds 2 model files of another plan; rerun the command "
                   f"that trained them (it writes its plan again), or pass --replace_plan to set them aside and "
                   f"train this plan there")
    assert {p.name: p.read_bytes() for p in (store / "models").iterdir()} == before and not (store / "plan.json").exists()

    assert train_splits.main(argv) == 0  # the original command writes its plan again and trains nothing
    assert "2 stored, 0 to train" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (store / "models").iterdir()} == before

    (store / "plan.json").unlink()
    assert train_splits.main([*argv, "--lr", "0.2", "--replace_plan"]) == 0
    assert len(list((store / "models").glob("model_*.corrupt-*"))) == 2  # set aside, not deleted
    plan = SubsetStore(store).load_plan()
    assert plan.settings["training"]["lr"] == 0.2 and SubsetStore(store).finished_models(plan)[0] == [0, 1]


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # real processes: a driver killed with -9 and its pool
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the pool's processes through /proc")
def test_pool_workers_end_when_their_driver_is_killed(tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "train_splits.py", *ARGV, "--n_models", "6", "--n_epochs", "200", "--mlp_hidden", "256",
               "--out", str(store), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--launcher", "pool",
               "--workers", "2"]
    driver = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while len(list((store / "progress").glob("group_*"))) < 2 and time.time() < deadline:
        time.sleep(0.1)  # both workers are training
    workers = children(driver.pid)
    assert len(workers) >= 2 and driver.poll() is None, "the pool did not start"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 20
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
