"""Records in the user's cache only save time: one that is not this user's own, is writable by others, or
holds more than it should is ignored and built again, and none of them is code."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

from mlflow.tracking import MlflowClient


def test_a_planted_store_template_cannot_redirect_a_new_stores_artifacts(tmp_path, monkeypatch):
    from utils import mlflow_logger

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = mlflow_logger.RunLogger(f"sqlite:///{tmp_path / 'first.db'}", "exp", run_name="r")
    first.finish()
    (template,) = (tmp_path / "cache" / "continual-memorization").glob("mlflow-*-empty-store.db")
    assert oct(template.stat().st_mode & 0o777) == "0o600"
    # Someone adds an experiment with the framework's name and their own artifact folder to the template.
    with sqlite3.connect(template) as connection:
        row = connection.execute("SELECT * FROM experiments WHERE experiment_id = 0").fetchone()
        columns = [c[1] for c in connection.execute("PRAGMA table_info('experiments')")]
        planted = dict(zip(columns, row)) | {"experiment_id": 7, "name": "continual-learning",
                                             "artifact_location": str(tmp_path / "elsewhere")}
        connection.execute(f"INSERT INTO experiments ({', '.join(planted)}) VALUES ({', '.join('?' * len(planted))})",
                           list(planted.values()))
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    logger = mlflow_logger.RunLogger(uri, "continual-learning", run_name="r")
    logger.log_text("x", "a.txt")
    logger.finish()
    experiment = MlflowClient(uri).get_experiment_by_name("continual-learning")
    assert experiment.artifact_location == (tmp_path / "new" / "mlruns" / "continual-learning").as_uri()
    assert not (tmp_path / "elsewhere").exists()
    with sqlite3.connect(template) as connection:  # the template was built again from MLflow
        assert connection.execute("SELECT experiment_id FROM experiments").fetchall() == [(0,)]


def test_a_template_writable_by_others_is_built_again(tmp_path, monkeypatch):
    from utils import mlflow_logger, mlflow_store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mlflow_logger.RunLogger(f"sqlite:///{tmp_path / 'a.db'}", "exp").finish()
    (template,) = (tmp_path / "cache" / "continual-memorization").glob("mlflow-*-empty-store.db")
    os.chmod(template, 0o666)
    assert not mlflow_store._trusted_template(template)
    mlflow_logger.RunLogger(f"sqlite:///{tmp_path / 'b.db'}", "exp").finish()
    assert oct(template.stat().st_mode & 0o777) == "0o600"


def test_a_catalogue_record_writable_by_others_is_not_read(tmp_path, monkeypatch):
    from continual import catalogue

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(catalogue, "_loaded", None)
    built = catalogue.catalogue()
    (record,) = (tmp_path / "cache" / "continual-memorization").glob("catalogue-*.json")
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    # A record with the right digest whose flags were changed, left writable by anyone.
    content = json.loads(record.read_text())
    content["families"]["model"]["aliases"]["planted"] = "er"
    shutil.copyfile(record, tmp_path / "kept.json")
    record.write_text(json.dumps(content))
    os.chmod(record, 0o666)
    monkeypatch.setattr(catalogue, "_loaded", None)
    assert "planted" not in catalogue.catalogue()["model"].names()
    assert catalogue.catalogue()["model"].names() == built["model"].names()
    assert oct(record.stat().st_mode & 0o777) == "0o600"  # rebuilt and written again
