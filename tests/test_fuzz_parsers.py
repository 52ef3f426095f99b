"""Every file a user hands the tools, filled with anything: random bytes, wrong types, wrong shapes, NaN,
huge values. Each parser returns a valid result or raises ConfigError (one sentence); nothing else."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from utils.errors import ConfigError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)


@lru_cache(maxsize=1)
def digits():
    from datasets import DATASETS

    return DATASETS.get("seq-digits")(argparse.Namespace(device="cpu", n_tasks=None, data_path="./data",
                                                         download=False, class_order=None, permute_classes=False,
                                                         label_noise=0.0, seed=0))


def expect_config_error_or(parse, check=lambda result: None):
    try:
        result = parse()
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        return
    check(result)


ARRAYS = hnp.arrays(dtype=st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes(),
                                    hnp.unicode_string_dtypes(max_len=3), hnp.complex_number_dtypes()),
                    shape=st.one_of(st.just((1438,)), hnp.array_shapes(max_dims=3, max_side=8)))


@FUZZ
@given(array=ARRAYS, sidecar=st.one_of(st.none(), st.binary(max_size=64), JSON.map(json.dumps)))
def test_score_files_and_sidecars(array, sidecar):
    from memorization.score_format import load_scores

    folder = Path(tempfile.mkdtemp())
    try:
        np.save(folder / "s.npy", array)
        if sidecar is not None:
            (folder / "s.json").write_bytes(sidecar if isinstance(sidecar, bytes) else sidecar.encode())

        def check(scores):
            assert scores.dtype == np.float32 and scores.shape == (1438,)

        expect_config_error_or(lambda: load_scores(str(folder / "s.npy"), digits()), check)
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import train_splits
    from memorization.driver import run_plan

    folder = tmp_path_factory.mktemp("store")
    run_plan(train_splits.parse_args(["--n_models", "2", "--n_epochs", "1", "--lr", "0.1", "--mlp_hidden", "8",
                                      "--non_verbose", "--out", str(folder / "store"),
                                      "--tracking_uri", f"sqlite:///{folder / 'm.db'}"]))
    return folder / "store"


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())),
       damaged=st.sampled_from(["plan.json", "plan_arrays.npz", "noisy_mask.npy"]))
def test_plan_files(store, content, damaged):
    from memorization.store import SubsetStore

    copy = Path(tempfile.mkdtemp()) / "store"
    try:
        shutil.copytree(store, copy)
        (copy / damaged).write_bytes(content)
        expect_config_error_or(lambda: SubsetStore(copy).load_plan())
    finally:
        shutil.rmtree(copy.parent)


SWEEP_KEYS = st.sampled_from(["name", "base", "methods", "selection", "search_seeds", "final_seeds", "other"])


@FUZZ
@given(spec=st.one_of(JSON, st.dictionaries(SWEEP_KEYS, JSON, max_size=6)), raw=st.one_of(st.none(), st.binary(max_size=80)))
@example(spec={}, raw=b"?")  # YAML's explicit-key mark: {None: None}, keys that are not text
@example(spec={}, raw=b"name: a\nmethods:\n  er:\n    3: 4\n    reuse: [5]\n")
@example(spec={"\n": None}, raw=None)  # a key that is a newline: the message must stay one line
@example(spec={}, raw=b'{base: {}, selection: x, search_seeds: [0], final_seeds: [1], methods: {"a\\nb": 3}}')
def test_sweep_files(spec, raw):
    from continual.sweep_spec import load_sweep

    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "s.yaml"
        path.write_bytes(raw if raw is not None else yaml.safe_dump(spec).encode())
        expect_config_error_or(lambda: load_sweep(str(path)))
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(content=st.binary(max_size=300))
def test_checkpoints(content):
    from utils.checkpoint import load_checkpoint

    folder = Path(tempfile.mkdtemp())
    try:
        (folder / "c.pt").write_bytes(content)
        expect_config_error_or(lambda: load_checkpoint(folder / "c.pt"))
    finally:
        shutil.rmtree(folder)
