"""Memorization score files: a float32 array in dataset order (NaN where undefined) with a JSON sidecar naming
its dataset. Placing values in dataset order, saving a file with its sidecar, reading one back checked against
the dataset it is used with, and comparing two.

A score file and its sidecar are one pair: the sidecar records the SHA-256 of the score file's bytes
(`scores_sha256`), both are written under temporary names and renamed into place, and reading refuses a
score file whose sidecar was written for other scores (an evaluation killed between the two renames, or a
file copied over another's). eval_splits.py adds to the sidecar the MLflow run that computed the scores and
its tracking store (`mlflow_run_id`, `mlflow_tracking_uri`), so a run that uses the file can link to it;
sidecars written before those fields are read as before.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from datasets import ContinualDataset
from memorization.plan import fingerprint
from utils.errors import ConfigError


def in_dataset_order(values: np.ndarray, rows: np.ndarray, n_total: int) -> np.ndarray:
    """Scores of the planned examples placed at their dataset rows; NaN for rows outside the plan."""
    out = np.full(n_total, np.nan, dtype=np.float32)
    out[rows] = values
    return out


def counts_in_dataset_order(values: np.ndarray, rows: np.ndarray, n_total: int) -> np.ndarray:
    """Per-example counts of the planned examples at their dataset rows; 0 for rows outside the plan."""
    out = np.zeros(n_total, dtype=np.int32)
    out[rows] = values
    return out


def compare_with(path: str, scores: np.ndarray) -> float:
    """Spearman correlation with another score file over the examples both define; lengths must agree."""
    from scipy.stats import spearmanr

    try:
        other = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--compare {path} is not a readable .npy file ({type(error).__name__})") from None
    if other.ndim != 1 or len(other) != len(scores):
        raise ConfigError(f"--compare {path} holds {other.shape} scores but this dataset has {len(scores)} training "
                          f"examples; pass a score file of the same dataset, in dataset order")
    both = np.isfinite(other) & np.isfinite(scores)
    return float(spearmanr(other[both], scores[both]).statistic)


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of the bytes np.save writes for `array` (what a sidecar binds its score file by)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def save_scores(path: Path | str, scores: np.ndarray, sidecar: dict) -> None:
    """A score file and its sidecar (the same name, .json), bound by the score file's digest and each written
    to a temporary name first, then renamed: the score file, then the sidecar."""
    path = Path(path)
    sidecar = {**sidecar, "scores_sha256": array_digest(scores)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary_sidecar = path.with_name(f".{path.stem}.json.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            np.save(file, scores, allow_pickle=False)
        temporary_sidecar.write_text(json.dumps(sidecar, indent=2))
        os.replace(temporary, path)
        os.replace(temporary_sidecar, path.with_suffix(".json"))
    finally:
        temporary.unlink(missing_ok=True)
        temporary_sidecar.unlink(missing_ok=True)


def record_score_run(path: Path | str, scores: np.ndarray, run_id: str, tracking_uri: str) -> None:
    """Name in the sidecar of `path` the MLflow run that computed `scores` and its tracking store; the score file
    is not rewritten, so the pair stays bound by the same digest. The sidecar is written to a temporary name and
    renamed; a pair on disk that no longer holds `scores` (another evaluation wrote it since) is left alone."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    if meta.get("scores_sha256") != array_digest(scores) or meta["scores_sha256"] != file_digest(path):
        raise ConfigError(f"{path} and {sidecar.name} were replaced by another evaluation while this one logged to "
                          f"MLflow; run eval_splits.py again to write the pair with its run")
    meta |= {"mlflow_run_id": run_id, "mlflow_tracking_uri": tracking_uri}
    temporary = path.with_name(f".{path.stem}.json.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(meta, indent=2))
        os.replace(temporary, sidecar)
    finally:
        temporary.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def original_train_labels(dataset: ContinualDataset) -> np.ndarray:
    """Training labels in the dataset's own class numbering (undoing --class_order), as score files see them."""
    return dataset.class_order[dataset.train.labels.cpu().numpy()]


def load_scores(path: str, dataset: ContinualDataset) -> np.ndarray:
    """A float32 score per training example in dataset order, checked against the dataset; NaN = undefined.

    Accepts eval_splits.py output (checked against its JSON sidecar: dataset and label fingerprint)
    and the memorization-in-CL paper's released float32 arrays (checked by length).
    """
    file = score_file(path)
    try:
        scores = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--mem_scores {path} is not a readable .npy array ({type(error).__name__})") from None
    n = len(dataset.train)
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ConfigError(f"--mem_scores {path} holds {scores.dtype} values, not numbers; pass the float32 score "
                          f"file written by eval_splits.py")
    if scores.ndim != 1 or len(scores) != n:
        raise ConfigError(f"--mem_scores {path} holds {scores.shape} scores but {dataset.NAME} has {n} training "
                          f"examples; pass the score file of this dataset, in dataset order")
    if not np.isfinite(scores).any():
        raise ConfigError(f"--mem_scores {path} holds no finite score (every value is NaN or infinite), so no "
                          f"example can be chosen by it; pass the scores of an evaluation that defined some")
    meta = checked_sidecar(file, path)
    if meta is not None:
        if meta.get("dataset") not in (None, dataset.NAME):
            raise ConfigError(f"--mem_scores {path} was computed on {meta['dataset']}, not {dataset.NAME}; pass "
                              f"the score file of {dataset.NAME}")
        expected = meta.get("label_fingerprint")
        if expected is not None and expected != fingerprint(original_train_labels(dataset)):
            same = (f"pass --label_noise {meta['label_noise']} --seed {meta['seed']} as the score file's plan had"
                    if meta.get("label_noise") is not None else "pass the --label_noise and --seed of its plan")
            raise ConfigError(f"--mem_scores {path} was computed on other training labels than this run's "
                              f"(another --label_noise or --seed, or other data files); {same}")
    return scores.astype(np.float32)


def score_file(path: str) -> Path:
    """The --mem_scores file, which must exist."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--mem_scores {path}: no such file; pass the .npy written by eval_splits.py")
    return file


def checked_sidecar(file: Path, path: str, digest: str | None = None) -> dict | None:
    """The sidecar of a --mem_scores file as a mapping, checked to have been written for this file's bytes (their
    SHA-256, `digest` when the caller has it); None for a file without one (a released array)."""
    sidecar = file.with_suffix(".json")
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"the sidecar {sidecar} of --mem_scores is not readable JSON ({type(error).__name__}); "
                          f"write it again with eval_splits.py or delete it") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"the sidecar {sidecar} of --mem_scores is a {type(meta).__name__}, not the mapping "
                          f"eval_splits.py writes; write it again with eval_splits.py or delete it")
    expected = meta.get("scores_sha256")
    if expected is not None and expected != (digest or file_digest(file)):
        raise ConfigError(f"--mem_scores {path} does not match its sidecar {sidecar.name}, which was written for "
                          f"other scores (an evaluation stopped between the two files, or one was copied over); "
                          f"run eval_splits.py again to write the pair")
    return meta


def score_source_tags(path: str) -> dict[str, str]:
    """The tags of a run that uses the score file `path`: its SHA-256 and, where its sidecar names them, the MLflow
    run that computed it and that run's tracking store. A released array without a sidecar gives its digest only."""
    file = score_file(path)
    digest = file_digest(file)
    meta = checked_sidecar(file, path, digest) or {}
    tags = {"mem_scores_sha256": digest, "mem_scores_run_id": meta.get("mlflow_run_id"),
            "mem_scores_tracking_uri": meta.get("mlflow_tracking_uri")}
    return {key: str(value) for key, value in tags.items() if value}
