"""`--help` of every script reads no heavy package (torch, MLflow, numpy, scipy, numba, timm, scikit-learn): the
scripts import their engines only once the arguments are good, and read the components from the catalogue. A test
of what is imported, not of timing (benchmarks/README.md, "Start-up", has the measured seconds)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

HEAVY = ("torch", "mlflow", "numpy", "scipy", "numba", "timm", "sklearn", "matplotlib")
PROBE = """
import contextlib, io, runpy, sys
sys.argv = {argv!r}
try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("CODE", code, "USAGE", "usage:" in out.getvalue())
print("HEAVY", ",".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, str]:
    """An environment whose catalogue is recorded (the first start after a change of a component records it, which
    imports every family: that is not what a user's --help pays)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    subprocess.run([sys.executable, "-c", "from continual.catalogue import catalogue; catalogue()"], cwd=REPO_ROOT,
                   env=env, check=True, timeout=300)
    return env


@pytest.mark.slow  # a catalogue recorded for fresh interpreters
@pytest.mark.parametrize("argv", [["main.py", "--help"], ["main.py", "--model", "derpp", "--help"],
                                  ["train_splits.py", "--help"], ["train_splits.py", "--backbone", "vit", "--help"],
                                  ["eval_splits.py", "--help"], ["sweep.py", "--help"]])
def test_help_imports_no_heavy_package(cache, argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], cwd=REPO_ROOT, env=cache,
                         capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("CODE", "HEAVY")))
    assert lines["CODE"] == "0 USAGE True", out.stderr
    assert lines["HEAVY"].strip() == "", argv


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["train_splits.py", "--lr", "0.1", "--out", "s", "--n_modles", "3"],
                                  ["eval_splits.py", "--run_dir", "r", "--out", "s.npy", "--influence_topkk", "3"],
                                  ["sweep.py", "sweeps/random_label_digits.yaml", "--max_paralel", "2"]])
def test_a_mistyped_flag_imports_no_heavy_package_either(cache, argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], cwd=REPO_ROOT, env=cache,
                         capture_output=True, text=True, timeout=300)
    assert "CODE 2 USAGE False" in out.stdout and "HEAVY \n" in out.stdout, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "did you mean" in out.stderr


OPENBLAS_PROBE = """
import builtins, os, sys
real_import = builtins.__import__

def watched(name, *args, **kwargs):
    if name.split(".")[0] == "numpy" and "numpy" not in sys.modules:
        print("NUMPY_LOADED_WITH", os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        raise SystemExit(0)  # all that matters is known; the rest of the imports would only take time
    return real_import(name, *args, **kwargs)

builtins.__import__ = watched
import eval_splits
print("IMPORTED_WITHOUT_NUMPY")
eval_splits.score_store(None)  # what main() runs once the arguments are good: the engine, and numpy, load here
"""


@pytest.mark.parametrize("given,expected", [(None, "4"), ("12", "12")])
def test_eval_splits_sets_openblas_timeout_before_its_engine_loads_numpy(given, expected):
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it: eval_splits.py sets it on import (a value the
    user gave is kept), and numpy loads only with the engine, after the arguments are parsed."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run([sys.executable, "-c", OPENBLAS_PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["IMPORTED_WITHOUT_NUMPY", "NUMPY_LOADED_WITH", expected]
