"""eval_splits.py's score files per recorded epoch and per subset ratio, checked against a plain numpy estimate.

The store is a real train_splits.py plan (seq-digits, classes 0 and 1) whose model files hold synthetic
predictions, so that every score can be recomputed here from the arrays written into it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import eval_splits
import train_splits
from memorization import eval_driver
from memorization.driver import make_plan
from memorization.eval_driver import score_store
from memorization.score_format import load_scores
from memorization.store import SubsetStore
from memorization.training import load_plan_data

RATIOS, N_MODELS, RECORD_EPOCHS, N_EPOCHS, TOPK = (0.3, 0.7), 3, (1, 3), 5, 3


def build_store(folder, ratios=RATIOS, seed=0) -> dict:
    """A plan of len(ratios) × N_MODELS models; each model's file holds float16 probabilities that rise with the
    epoch and, on its own training examples, with inclusion. Returns the plan and the arrays written."""
    args = train_splits.parse_args(["--dataset", "seq-digits", "--classes", "0,2", "--n_models", str(N_MODELS),
                                    "--subset_ratio", ",".join(map(str, ratios)), "--n_epochs", str(N_EPOCHS),
                                    "--record_epochs", ",".join(map(str, RECORD_EPOCHS)), "--lr", "0.1",
                                    "--out", str(folder)])
    plan = make_plan(args)
    store = SubsetStore(folder)
    store.write_plan(plan)
    rng = np.random.default_rng(seed)
    n, m = plan.inclusion_mask.shape[1], plan.settings["n_test"]
    epochs = np.array(plan.settings["training"]["record_epochs"], np.int64)
    train = np.empty((plan.n_models, len(epochs), n), np.float16)
    test = np.empty((plan.n_models, len(epochs), m), np.float16)
    for model_id in range(plan.n_models):
        included = plan.inclusion_mask[model_id]
        for e, epoch in enumerate(epochs):
            fit = epoch / N_EPOCHS
            train[model_id, e] = np.clip(rng.random(n) * 0.6 + fit * 0.4 * included, 0, 1)
            test[model_id, e] = np.clip(rng.random(m) * (0.5 + 0.5 * fit), 0, 1)
        store.write_model(model_id, plan.hash, epochs=epochs, prob_train=train[model_id],
                          correct_train=train[model_id] > 0.5, prob_test=test[model_id],
                          correct_test=test[model_id] > 0.5)
    return {"plan": plan, "epochs": epochs.tolist(), "train": train.astype(np.float64),
            "test": test.astype(np.float64)}


def evaluate(store, out, tracking):
    return score_store(eval_splits.parse_args(["--run_dir", str(store), "--out", str(out), "--influence_topk",
                                               str(TOPK), "--tracking_uri", tracking]))


def held_out(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Influence [n, m] of training example i on the targets [models, m]: mean target of the models holding i
    minus that of the others, a loop in float64; NaN where i was never left out or never included."""
    out = np.full((mask.shape[1], target.shape[1]), np.nan)
    for i in range(mask.shape[1]):
        held = mask[:, i]
        if held.any() and not held.all():
            out[i] = target[held].mean(0) - target[~held].mean(0)
    return out


def memorized(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Memorization [n] from the training targets [models, n]: each example's influence on itself."""
    return np.array([held_out(mask[:, [i]], target[:, [i]])[0, 0] for i in range(mask.shape[1])])


def dataset_order(values: np.ndarray, plan) -> np.ndarray:
    out = np.full(plan.settings["n_train_total"], np.nan)
    out[plan.train_indices] = values
    return out


def assert_scores(path, expected) -> None:
    scores = np.load(path, allow_pickle=False)
    assert scores.dtype == np.float32 and scores.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(scores), np.isnan(expected))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=2e-6)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The two-ratio store evaluated once. The report folder is left out: its figures take seconds, do not
    depend on these files, and are tested in test_split_report.py and test_split_training.py."""
    folder = tmp_path_factory.mktemp("scores")
    built = build_store(folder / "store")
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval_driver, "write_report_for", lambda *args: [])
        result = evaluate(folder / "store", folder / "out" / "digits.npy", tracking)
    dataset = load_plan_data(built["plan"], "./data", "cpu").dataset
    return {**built, "out": folder / "out", "result": result, "tracking": tracking, "dataset": dataset}


def test_every_recorded_epoch_has_the_scores_of_its_own_predictions(evaluated):
    plan, out = evaluated["plan"], evaluated["out"]
    assert evaluated["epochs"] == [1, 3, 5]
    assert sorted(p.name for p in (out / "digits_epochs").iterdir()) == ["epoch_1", "epoch_3", "epoch_5"]
    pooled = json.loads((out / "digits.json").read_text())
    assert pooled["files"]["epochs"] == "digits_epochs"
    for e, epoch in enumerate(evaluated["epochs"]):
        folder = out / "digits_epochs" / f"epoch_{epoch}"
        assert sorted(p.name for p in folder.iterdir()) == ["influence_topk.npz", "mem.json", "mem.npy"]
        expected = dataset_order(memorized(plan.inclusion_mask, evaluated["train"][:, e]), plan)
        assert_scores(folder / "mem.npy", expected)
        sidecar = json.loads((folder / "mem.json").read_text())
        assert sidecar["epoch"] == epoch and sidecar["n_undefined"] == int(np.isnan(expected).sum() - (
            plan.settings["n_train_total"] - plan.settings["n_train"]))
        assert sidecar["plan_hash"] == plan.hash and sidecar["dataset"] == "seq-digits"
        loaded = load_scores(str(folder / "mem.npy"), evaluated["dataset"])
        np.testing.assert_array_equal(loaded, np.load(folder / "mem.npy"))
    # The scores differ between epochs (the synthetic fit grows), and the last epoch's are the pooled file's.
    first, last = (np.load(out / "digits_epochs" / f"epoch_{e}" / "mem.npy") for e in (1, 5))
    assert np.nanmean(last) > np.nanmean(first) + 0.1
    np.testing.assert_array_equal(last, np.load(out / "digits.npy"))


def test_every_recorded_epoch_has_the_topk_of_its_influence_matrix(evaluated):
    plan, out = evaluated["plan"], evaluated["out"]
    rows, m, exact = plan.train_indices, plan.settings["n_test"], 0
    for e, epoch in enumerate(evaluated["epochs"]):
        with np.load(out / "digits_epochs" / f"epoch_{epoch}" / "influence_topk.npz") as arrays:
            index, value = arrays["topk_index"], arrays["topk_value"]
        assert index.shape == value.shape == (m, TOPK)
        matrix = held_out(plan.inclusion_mask, evaluated["test"][:, e])  # [n, m], NaN rows undefined
        for j in range(m):
            column = np.where(np.isnan(matrix[:, j]), -np.inf, matrix[:, j])
            order = np.lexsort((np.arange(len(column)), -column))[:TOPK + 1]  # value descending, lower index first
            np.testing.assert_allclose(value[j], column[order[:TOPK]], rtol=1e-5, atol=2e-6)
            # The reported training examples (dataset indices) carry those values.
            planned = np.searchsorted(rows, index[j])
            assert np.array_equal(rows[planned], index[j]) and len(set(index[j].tolist())) == TOPK
            np.testing.assert_allclose(matrix[planned, j], value[j], rtol=1e-5, atol=2e-6)
            # Examples held by the same models tie exactly, here and in the estimator (ties go to the lower
            # index); where no other values lie within rounding of each other, the order is the very same.
            gaps = np.abs(np.diff(column[order]))
            if ((gaps == 0) | (gaps > 1e-4)).all():
                np.testing.assert_array_equal(index[j], rows[order[:TOPK]])
                exact += 1
    assert exact >= 0.9 * m * len(evaluated["epochs"])
    # The final epoch's top-k is the pooled influence file's.
    with np.load(out / "digits_influence.npz") as pooled, \
            np.load(out / "digits_epochs" / "epoch_5" / "influence_topk.npz") as last:
        np.testing.assert_array_equal(pooled["topk_index"], last["topk_index"])
        np.testing.assert_array_equal(pooled["topk_value"], last["topk_value"])


def test_one_score_file_per_ratio_from_that_ratios_models_only(evaluated):
    plan, out = evaluated["plan"], evaluated["out"]
    mask, final = plan.inclusion_mask, evaluated["train"][:, -1]
    pooled = json.loads((out / "digits.json").read_text())
    assert pooled["files"]["per_ratio"] == {"0.3": "digits_ratio0.3.npy", "0.7": "digits_ratio0.7.npy"}
    assert_scores(out / "digits.npy", dataset_order(memorized(mask, final), plan))
    files = {}
    for ratio in RATIOS:
        chosen = plan.model_ratio == ratio
        expected = dataset_order(memorized(mask[chosen], final[chosen]), plan)
        path = out / f"digits_ratio{ratio}.npy"
        assert_scores(path, expected)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["subset_ratio"] == ratio and sidecar["subset_ratios"] == [ratio]
        assert sidecar["n_models"] == sidecar["n_models_planned"] == N_MODELS
        assert sidecar["pooled"] == "digits.npy" and sidecar["label_fingerprint"] == pooled["label_fingerprint"]
        loaded = load_scores(str(path), evaluated["dataset"])
        np.testing.assert_array_equal(loaded, np.load(path))
        files[ratio] = loaded
    # With three models per ratio, some examples are in no model of ratio 0.3 and some in every model of ratio
    # 0.7: undefined in that ratio's file, defined in the pooled one.
    pooled_scores = np.load(out / "digits.npy")[plan.train_indices]
    for ratio in RATIOS:
        undefined = np.isnan(files[ratio][plan.train_indices])
        assert 0 < undefined.sum() < len(undefined) and np.isfinite(pooled_scores[undefined]).all()
    assert not np.array_equal(files[0.3], files[0.7], equal_nan=True)
    # The C-score still averages the ratios' held-out means.
    held_out_means = []
    for ratio in RATIOS:
        chosen = plan.model_ratio == ratio
        left_out = ~mask[chosen]
        with np.errstate(invalid="ignore"):
            held_out_means.append((final[chosen] * left_out).sum(0) / left_out.sum(0))
    cscore = np.nanmean(held_out_means, axis=0)  # every example is left out by a model of some ratio
    assert_scores(out / "digits_cscore.npy", dataset_order(cscore, plan))


def test_the_new_files_are_logged_to_mlflow(evaluated):
    client = MlflowClient(evaluated["tracking"])
    run, = client.search_runs([client.get_experiment_by_name("split-training").experiment_id],
                              filter_string=f"params.out = '{evaluated['out'] / 'digits.npy'}'")
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"digits.npy", "digits_ratio0.3.npy", "digits_ratio0.7.json", "digits_epochs"} <= top
    epoch = {a.path for a in client.list_artifacts(run.info.run_id, "digits_epochs/epoch_3")}
    assert epoch == {f"digits_epochs/epoch_3/{name}" for name in ("mem.npy", "mem.json", "influence_topk.npz")}


def test_a_single_ratio_writes_no_ratio_file_and_a_second_evaluation_replaces_the_first(tmp_path, evaluated,
                                                                                        monkeypatch):
    """One ratio: the per-epoch folder, no per-ratio file. Evaluated into the NAME of the two-ratio run, the
    earlier per-ratio files and epochs go, so the folder never mixes two stores."""
    monkeypatch.setattr(eval_driver, "write_report_for", lambda *args: [])
    built = build_store(tmp_path / "store", ratios=(0.5,), seed=1)
    out = evaluated["out"].parent / "again"
    out.mkdir()
    for name in ("digits_ratio0.3.npy", "digits_ratio0.3.json"):
        (out / name).write_bytes((evaluated["out"] / name).read_bytes())
    (out / "digits_epochs" / "epoch_2").mkdir(parents=True)
    evaluate(tmp_path / "store", out / "digits.npy", evaluated["tracking"])
    assert not list(out.glob("digits_ratio*"))
    assert "per_ratio" not in json.loads((out / "digits.json").read_text())["files"]
    assert sorted(p.name for p in (out / "digits_epochs").iterdir()) == ["epoch_1", "epoch_3", "epoch_5"]
    plan = built["plan"]
    assert_scores(out / "digits_epochs" / "epoch_3" / "mem.npy",
                  dataset_order(memorized(plan.inclusion_mask, built["train"][:, 1]), plan))
