"""Reader of the per-run `aux_arrays.npz` files released with the held-out influence-estimation checkpoints.

Layout: <root>/<ratio>/<seed>/aux_arrays.npz, each with `subsample_idx` (the training examples the
model was trained on), `correctness_train` at `index_train` (included examples),
`correctness_removed` at `index_removed` (left-out examples) and `correctness_test` at `index_test`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import ConfigError

KEYS = ("correctness_train", "index_train", "correctness_removed", "index_removed", "correctness_test", "index_test")


def find_released_runs(root: str | Path) -> list[Path]:
    return sorted(Path(root).glob("**/aux_arrays.npz"))


def _ratio_of(path: Path, n_included: int, n: int) -> float:
    try:
        return float(path.parent.parent.name)  # <ratio>/<seed>/aux_arrays.npz
    except ValueError:
        return n_included / n


def read_released_runs(root: str | Path) -> dict[str, np.ndarray]:
    """Inclusion mask [K, n], 0/1 correctness on train [K, n] and test [K, m], and each model's ratio."""
    paths = find_released_runs(root)
    if not paths:
        raise ConfigError(f"{root} holds neither a train_splits.py plan.json nor released aux_arrays.npz files")
    runs = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                runs.append({key: data[key] for key in KEYS})
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise ConfigError(f"{path} is not a readable aux_arrays.npz with {', '.join(KEYS)} "
                              f"({type(error).__name__}); remove it or download it again") from None
    n = 1 + max(int(max(r["index_train"].max(), r["index_removed"].max())) for r in runs)
    m = 1 + max(int(r["index_test"].max()) for r in runs)
    mask = np.zeros((len(runs), n), dtype=bool)
    train = np.zeros((len(runs), n), dtype=np.float32)
    test = np.zeros((len(runs), m), dtype=np.float32)
    ratio = np.zeros(len(runs))
    for k, (run, path) in enumerate(zip(runs, paths)):
        if len(run["index_train"]) + len(run["index_removed"]) != n or len(run["index_test"]) != m:
            raise ConfigError(f"{path} covers {len(run['index_train']) + len(run['index_removed'])} training and "
                              f"{len(run['index_test'])} test examples, others cover {n} and {m}; the runs under "
                              f"{root} are not from one dataset")
        mask[k, run["index_train"]] = True
        train[k, run["index_train"]] = run["correctness_train"]
        train[k, run["index_removed"]] = run["correctness_removed"]
        test[k, run["index_test"]] = run["correctness_test"]
        ratio[k] = _ratio_of(path, len(run["index_train"]), n)
    return {"mask": mask, "train": train, "test": test, "ratio": ratio, "paths": paths}
