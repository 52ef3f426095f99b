"""Start-up: `--help` and argument errors read the component catalogue, never torch; the catalogue
always says what the code says; eval_splits.py sets OpenBLAS's idle-thread timeout before numpy loads."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from continual import catalogue
from tests.conftest import REPO_ROOT

PROBE = """
import sys
sys.argv = ["main.py", *{argv!r}]
import main
try:
    code = main.main()
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "mlflow", "timm", "sklearn", "scipy", "matplotlib") if m in sys.modules)
print("HEAVY", ",".join(heavy), "CODE", code)
"""


def probe(argv: list[str], cache: str) -> tuple[list[str], int, str]:
    """Run main.py's main in a fresh interpreter: the heavy packages it imported, its exit code, stderr."""
    env = {**os.environ, "XDG_CACHE_HOME": cache}
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")][-1].split()
    return [m for m in line[1].split(",") if m] if line[1] != "CODE" else [], int(line[-1]), out.stderr


@pytest.mark.slow
def test_help_and_argument_errors_import_no_heavy_package_once_the_catalogue_is_recorded(tmp_path):
    cache = str(tmp_path / "cache")
    heavy, code, _ = probe(["--help"], cache)  # the first start records the catalogue: it imports the families
    assert code == 0 and "torch" in heavy
    assert list((tmp_path / "cache" / "continual-memorization").glob("catalogue-*.json"))
    for argv, expected_code, sentence in (
            (["--help"], 0, ""),
            (["--model", "er", "--lr", "0.1", "--no_such_flag", "1"], 2, "unrecognized arguments: --no_such_flag"),
            (["--model", "no_such_model", "--lr", "0.1"], 2, "unknown model 'no_such_model'"),
            (["--model", "er", "--lr", "-1"], 2, "--lr must be in (0, inf)"),
            (["--model", "er", "--lr", "0.1", "--redo_tau", "0.1"], 2, "belongs to the plasticity method redo"),
            (["--model", "er", "--lr", "0.1", "--plasticity", "redo,redo"], 2, "lists a method twice"),
            (["--model", "er", "--dataset", "seq-digits", "--batch_size", "x", "--lr", "0.1"], 2, "invalid int")):
        heavy, code, stderr = probe(argv, cache)
        assert (heavy, code) == ([], expected_code), (argv, stderr)
        assert sentence in stderr


def test_the_catalogue_records_every_component_as_its_registry_declares_it():
    from utils.registry import declared_flags

    recorded = catalogue.build()
    assert set(recorded) == set(catalogue.FAMILIES)
    for kind, (package, registry_name) in catalogue.FAMILIES.items():
        registry = getattr(__import__(package), registry_name)
        assert recorded[kind].names() == registry.names()
        for name in registry.names():
            cls, component = registry.get(name), recorded[kind].get(name)
            assert component.NAME == cls.NAME
            parser = __import__("argparse").ArgumentParser(add_help=False)
            component.add_args(parser)
            assert {a.dest: tuple(a.option_strings) for a in parser._actions} == declared_flags(cls)
            for attribute in catalogue.ATTRIBUTES:
                assert getattr(component, attribute, None) == getattr(cls, attribute, None)
    with pytest.raises(Exception, match="unknown model 'nope'; known models: "):
        recorded["model"].get("nope")


def test_a_changed_source_file_or_a_damaged_record_rebuilds_the_catalogue(tmp_path, monkeypatch):
    copy = tmp_path / "checkout"
    for source in catalogue.SOURCES:
        target = copy / source
        if (REPO_ROOT / source).is_dir():
            shutil.copytree(REPO_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / source, target)
    assert catalogue.source_digest(copy) == catalogue.source_digest(REPO_ROOT)
    model_file = copy / "models" / "er.py"
    model_file.write_text(model_file.read_text() + "\n# a comment changes the digest too\n")
    assert catalogue.source_digest(copy) != catalogue.source_digest(REPO_ROOT)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(catalogue, "_loaded", None)
    built = catalogue.catalogue()
    record = next((tmp_path / "cache" / "continual-memorization").glob("catalogue-*.json"))
    recorded = json.loads(record.read_text())
    families = catalogue._from_json(recorded["families"])
    assert recorded["digest"] == catalogue.source_digest() and families["model"].names() == built["model"].names()

    record.write_bytes(b"not json")  # damaged: rebuilt and rewritten, never an error
    monkeypatch.setattr(catalogue, "_loaded", None)
    assert catalogue.catalogue()["dataset"].names() == built["dataset"].names()
    assert json.loads(record.read_text())["digest"] == recorded["digest"]

    record.write_text(json.dumps({"digest": "a digest of other sources", "families": {}}))  # stale: rebuilt
    monkeypatch.setattr(catalogue, "_loaded", None)
    assert catalogue.catalogue()["backbone"].names() == built["backbone"].names()


def test_the_digits_are_read_from_scikit_learns_file_exactly_as_load_digits_reads_them():
    from sklearn.datasets import load_digits

    from datasets.digits import digits_file, load_digits_split

    digits = load_digits()
    with gzip.open(digits_file(), "rt") as f:
        assert len(f.readlines()) == 1797
    train_x, train_y, test_x, test_y = load_digits_split()
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    # every row of the split is a row of load_digits, with its label
    table = {row.tobytes(): label for row, label in zip(images, digits.target)}
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8)
        assert all(table[row.tobytes()] == label for row, label in zip(x, y))
    counts = np.bincount(np.concatenate([train_y, test_y]), minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(digits.target, minlength=10))


def test_a_new_store_is_a_copy_of_an_empty_store_with_mlflows_own_schema(tmp_path, monkeypatch):
    import sqlite3

    from mlflow.tracking import MlflowClient

    from utils import mlflow_logger

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        logger = mlflow_logger.RunLogger(uri, "exp", run_name="r")
        logger.log_metrics({"m": 1.0}, step=0)
        logger.finish("FINISHED")
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
        assert run.data.metrics == {"m": 1.0} and run.info.status == "FINISHED"
        assert client.get_experiment("0").artifact_location == str(tmp_path / name / "mlruns" / "0")
        stores.append(tmp_path / name / "mlflow.db")
    (template,) = (tmp_path / "cache" / "continual-memorization").glob("mlflow-*-empty-store.db")
    built = tmp_path / "built.db"
    MlflowClient(f"sqlite:///{built}").search_experiments()  # a store MLflow migrates itself

    def schema(path):
        """Tables with their columns, index names, and the migration version."""
        with sqlite3.connect(path) as connection:
            tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return ({table: [row[1] for row in connection.execute(f"PRAGMA table_info('{table}')")] for table in tables},
                    {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")},
                    connection.execute("SELECT version_num FROM alembic_version").fetchall())

    assert schema(template) == schema(built)
    tables, indexes, version = schema(stores[1])  # the copy, after a run was logged into it
    assert version == schema(built)[2] and tables == schema(built)[0] and indexes == schema(built)[1]


def test_without_a_writable_cache_mlflow_builds_the_store_itself(tmp_path, monkeypatch):
    from utils import mlflow_logger

    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_folder"))
    logger = mlflow_logger.RunLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", run_name="r")
    logger.finish("FINISHED")
    assert (tmp_path / "mlflow.db").stat().st_size > 0
