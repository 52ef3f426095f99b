"""Turn a split-training store into per-example memorization, influence and consistency scores.

    python eval_splits.py --run_dir runs/cifar100-r18 --out scores/cifar100_mem.npy [--target prob|correct]

Writes the scores as float32 .npy in dataset order (NaN where undefined) with a JSON sidecar,
the standard errors and in/out counts beside them, influence top-k and pairs, consistency scores
and one score file per ratio when the plan has several ratios, the scores and influence top-k of
every recorded epoch (NAME_epochs/epoch_<E>/), and a report folder; everything is also logged to MLflow.
A leave-one-out store (train_splits.py --plan_kind loo) gives the same score, standard-error, count and
influence files from p_full − p_without_i, averaged over its seeds (memorization/loo.py).

With --datamodels it also fits linear datamodels (Ilyas et al. 2022): per test example, a LASSO of the model's
margin on the test example (z_y - max other logit with --save_logits stores, else log p/(1-p) of the stored
probability) on the inclusion masks, its regularisation chosen on held-out models (--datamodel_val_fraction);
NAME_datamodels.npz holds the sparse θ, bias, alpha, validation R² and top-k per test example, and the report
compares θ with the held-out influence of the same margin. Not for released aux_arrays runs (correctness only).

A stream store (train_splits.py --plan_kind stream) gives memorization and influence at every task boundary and
the forgetting of high- against low-memorization examples (memorization/stream_eval.py). --proxies scores
single-run proxies against the estimator (memorization/proxy_eval.py); --lds_holdout / --lds_store / --loo_store
score the influence matrix as attribution (memorization/attribution_eval.py).
"""
from __future__ import annotations

import os
import sys

# Before numpy loads OpenBLAS: its idle threads then sleep right after each product instead of spinning for about
# 0.1 s on the cores that the estimator's numba passes need next (memorization/estimator.py).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from memorization.eval_args import parse_args  # noqa: E402
from utils.errors import run_command  # noqa: E402


def score_store(args):
    """memorization.eval_driver.score_store, imported here: numpy, scipy, numba and MLflow only once the arguments
    are good."""
    from memorization.eval_driver import score_store

    return score_store(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(score_store, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
