"""Several sweep.py drivers on one sweep share its cells, as train_splits.py drivers share a store's groups."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_sweep import SPEC, children, parents, write
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real processes


def test_two_drivers_on_one_sweep_run_each_cell_once_under_one_parent(tmp_path):
    path = write(tmp_path / "sweep.yaml", {**SPEC, "name": "shared"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "sweep.py", str(path), "--tracking_uri", uri, "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    drivers = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [driver.communicate(timeout=900)[0] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0], outputs
    ran = [len(re.findall(r"^\[\d+/\d+\] ", out, flags=re.MULTILINE)) for out in outputs]
    assert sum(ran) == 12 and min(ran) >= 1, ran  # every cell once, and both drivers worked
    cells = children(uri, "shared")
    assert len(cells) == 12 and len({r.data.tags["sweep_cell"] for r in cells}) == 12
    assert all(r.info.status == "FINISHED" for r in cells)
    (parent,) = parents(uri, "shared")
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent.info.run_id}
    assert sum(f"new sweep shared (parent run {parent.info.run_id})" in out for out in outputs) == 1
    assert list((tmp_path / "out" / "claims").iterdir()) == []  # every claim released
    reports = [re.search(r"^# .*?(?=^report: )", out, flags=re.MULTILINE | re.DOTALL) for out in outputs]
    assert reports[0] and reports[1] and reports[0].group() == reports[1].group()  # the same comparison
    assert json.loads(json.dumps(parent.data.params))["methods"] == "vanilla,redo"
    assert all(f"/runs/{parent.info.run_id}" in out for out in outputs)  # each driver points at the parent
