"""eval_splits.py's score files per recorded epoch and per subset ratio, beside the pooled NAME.npy.

Per recorded epoch E of a train_splits.py store (the plan's record_epochs, the final epoch included),
in the folder NAME_epochs/epoch_<E>/:
    mem.npy             memorization per training example after epoch E: float32, dataset order, NaN
                        where undefined (the format of NAME.npy, loadable with --mem_scores)
    mem.json            its sidecar: NAME.json's fields, with "epoch" and that epoch's "n_undefined"
    influence_topk.npz  topk_index [m, k] (dataset indices of the training examples, -1 where fewer than
                        k are defined) and topk_value [m, k] (NaN there), per test example, after epoch E
Per subset ratio R, when the models have several ratios: NAME_ratio<R>.npy (memorization estimated from
the models of ratio R only, final epoch) with its sidecar NAME_ratio<R>.json, whose "subset_ratio" is R.
"""
from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np

from memorization.estimator import influence, memorization
from memorization.score_format import in_dataset_order, save_scores

EPOCH_SCORES, EPOCH_TOPK = "mem.npy", "influence_topk.npz"


def epochs_folder(stem: Path) -> Path:
    return Path(f"{stem}_epochs")


def epoch_folder(stem: Path, epoch: int) -> Path:
    return epochs_folder(stem) / f"epoch_{int(epoch)}"


def ratio_path(stem: Path, ratio: float) -> Path:
    """NAME_ratio0.5.npy for ratio 0.5: the ratio as %g, as it appears in the plan."""
    return Path(f"{stem}_ratio{ratio:g}.npy")


def _base(sidecar: dict) -> dict:
    return {key: value for key, value in sidecar.items() if key != "files"}


def write_epoch_files(stem: Path, mask: np.ndarray, train: np.ndarray, test: np.ndarray, epochs: list[int],
                      rows: np.ndarray, n_total: int, sidecar: dict, topk: int,
                      final_influence: dict | None = None) -> Path:
    """The folder NAME_epochs with one epoch_<E> folder per recorded epoch (train, test: [epochs, models, ·]).

    `final_influence`, the influence of the last recorded epoch when already computed, is reused. The
    folder of an earlier evaluation to the same NAME is replaced, so it never holds epochs of another store."""
    if epochs_folder(stem).is_dir():
        shutil.rmtree(epochs_folder(stem))
    for index, epoch in enumerate(epochs):
        folder = epoch_folder(stem, epoch)
        folder.mkdir(parents=True, exist_ok=True)
        scores = memorization(mask, train[index])
        save_scores(folder / EPOCH_SCORES, in_dataset_order(scores["mem"], rows, n_total),
                      {**_base(sidecar), "epoch": int(epoch), "n_undefined": scores["n_undefined"],
                       "files": {"influence_topk": EPOCH_TOPK}})
        if index == len(epochs) - 1 and final_influence is not None:
            infl = final_influence
        else:  # top-k only: no pair is above an infinite threshold
            infl = influence(mask, test[index], topk=topk, threshold=np.inf)
        index_in_dataset = np.where(infl["topk_index"] >= 0, rows[infl["topk_index"]], -1)
        np.savez(folder / EPOCH_TOPK, topk_index=index_in_dataset, topk_value=infl["topk_value"])
    return epochs_folder(stem)


def write_ratio_files(stem: Path, mask: np.ndarray, target: np.ndarray, model_ratio: np.ndarray, rows: np.ndarray,
                      n_total: int, sidecar: dict, planned_ratio: np.ndarray | None = None) -> dict[float, Path]:
    """One score file (and sidecar) per subset ratio, from that ratio's models only; none for a single ratio.

    `target` is [models, n] (one epoch); `planned_ratio` the ratio of every planned model, for the counts.
    Per-ratio files of an earlier evaluation to the same NAME (their sidecar names NAME.npy) are removed."""
    ratio = np.round(np.asarray(model_ratio, np.float64), 6)
    ratios = sorted(set(ratio.tolist()))
    _remove_earlier_ratio_files(stem)
    if len(ratios) < 2:
        return {}
    planned = ratio if planned_ratio is None else np.round(np.asarray(planned_ratio, np.float64), 6)
    written = {}
    for value in ratios:
        chosen = ratio == value
        scores = memorization(np.asarray(mask)[chosen], target[chosen])
        path = ratio_path(stem, value)
        save_scores(path, in_dataset_order(scores["mem"], rows, n_total),
                      {**_base(sidecar), "subset_ratio": value, "subset_ratios": [value],
                       "n_models": int(chosen.sum()), "n_models_planned": int((planned == value).sum()),
                       "n_undefined": scores["n_undefined"], "pooled": f"{stem.name}.npy"})
        written[value] = path
    return written


def _remove_earlier_ratio_files(stem: Path) -> None:
    for path in stem.parent.glob(f"{glob.escape(stem.name)}_ratio*.npy"):
        try:
            pooled = json.loads(path.with_suffix(".json").read_text()).get("pooled")
        except (OSError, ValueError, AttributeError):
            continue  # not a file this module wrote: left alone
        if pooled == f"{stem.name}.npy":
            path.unlink()
            path.with_suffix(".json").unlink()


def write_score_files(stem: Path, data: dict, final_influence: dict, rows: np.ndarray, n_total: int, topk: int,
                      sidecar: dict) -> list[Path]:
    """The per-epoch folder (for a train_splits.py store) and the per-ratio files of eval_splits.py's data,
    named in sidecar["files"]; returns what to log beside the pooled files."""
    plan, written = data["plan"], []
    if plan is not None:
        written.append(write_epoch_files(stem, data["mask"], data["train"], data["test"], data["epochs"], rows,
                                         n_total, sidecar, topk, final_influence))
        sidecar["files"]["epochs"] = epochs_folder(stem).name
    per_ratio = write_ratio_files(stem, data["mask"], data["train"][-1], data["ratio"], rows, n_total, sidecar,
                                  plan.model_ratio if plan is not None else None)
    if per_ratio:
        sidecar["files"]["per_ratio"] = {f"{ratio:g}": path.name for ratio, path in per_ratio.items()}
    return written + [file for path in per_ratio.values() for file in (path, path.with_suffix(".json"))]
