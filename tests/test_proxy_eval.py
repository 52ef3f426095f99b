"""eval_splits.py --proxies: single-run proxies of a store's first model against the estimator of the others."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import eval_splits
import train_splits
from memorization.driver import run_plan
from memorization.store import SubsetStore
from utils.errors import ConfigError

EPOCHS = 4
PLAN = ["--dataset", "seq-digits", "--n_models", "8", "--subset_ratio", "0.5", "--n_epochs", str(EPOCHS),
        "--record_epochs", "1,2,3", "--lr", "0.1", "--batch_size", "32", "--label_noise", "0.1", "--non_verbose"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxies")
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    run_plan(train_splits.parse_args([*PLAN, "--out", str(folder / "store"), "--tracking_uri", tracking]))
    eval_splits.main(["--run_dir", str(folder / "store"), "--out", str(folder / "mem.npy"), "--proxies",
                      "--proxy_boot", "50", "--tracking_uri", tracking])
    return folder


def test_each_proxy_is_its_definition_on_the_first_models_record(evaluated):
    store = SubsetStore(evaluated / "store")
    plan = store.load_plan()
    model = store.read_model(0, plan)
    proxies = np.load(evaluated / "mem_proxies.npz")
    included = plan.inclusion_mask[0]
    correct, prob = model["correct_train"], model["prob_train"].astype(np.float64)
    for i in np.flatnonzero(included)[:60]:
        # learned-late: the first recorded epoch from which the example is right at every later record
        late = next((e + 1 for e in range(EPOCHS) if correct[e:, i].all()), EPOCHS + 1)
        assert proxies["learned_late"][i] == late
        assert proxies["cumulative_loss"][i] == pytest.approx(-np.log(np.clip(prob[:, i], 1e-7, 1)).sum(), rel=1e-5)
        step = model["learned_step_train"][i]
        assert proxies["learned_iteration"][i] == (step if step >= 0 else np.nan) or step < 0
        if model["never_learned_train"][i]:  # never right in a training pass: never learned there either
            assert step == -1
    assert np.isnan(proxies["learned_late"][~included]).all()  # the model never saw these
    assert (model["learned_step_train"][~included] == -1).all()
    steps = EPOCHS * math.ceil(included.sum() / 32)
    assert model["learned_step_train"].max() < steps
    # the reference is the estimator of the other 7 models, not of all 8
    target = np.stack([store.read_model(k, plan)["prob_train"][-1].astype(np.float32) for k in range(1, 8)])
    mask = plan.inclusion_mask[1:]
    expected = [target[mask[:, i], i].mean() - target[~mask[:, i], i].mean() for i in range(0, 1438, 97)]
    np.testing.assert_allclose(proxies["reference"][::97], expected, atol=1e-6)


def test_the_table_reaches_the_report_and_its_numbers_are_the_agreement(evaluated):
    from memorization.proxies import agreement

    rows = json.loads((evaluated / "mem_proxies.json").read_text())
    names = [row["name"] for row in rows]
    assert names == ["subset estimator (7 models)", "learned_late", "cumulative_loss", "forgetting_events",
                     "learned_iteration"]
    proxies = np.load(evaluated / "mem_proxies.npz")
    noisy = SubsetStore(evaluated / "store").load_plan().noisy_mask
    again = agreement(proxies["cumulative_loss"], proxies["reference"], relabeled=noisy, n_boot=50)
    row = rows[2]
    for key in ("n", "spearman", "spearman_lo", "pearson_hi", "top_10pct", "auroc_relabeled"):
        assert row[key] == pytest.approx(again[key])
    assert row["auroc_relabeled"] > 0.6  # relabeled examples are learned late and with high loss
    assert all(math.isfinite(row["seconds"]) and row["seconds"] > 0 for row in rows)
    report = (evaluated / "mem_report" / "summary.md").read_text()
    assert "## Memorization proxies" in report and "cumulative_loss" in report


def test_too_few_models_for_proxies_and_an_estimator_is_one_sentence(evaluated):
    with pytest.raises(ConfigError, match="--proxies uses 7 model\\(s\\) for the proxies"):
        eval_splits.score_store(eval_splits.parse_args([
            "--run_dir", str(evaluated / "store"), "--out", str(evaluated / "again.npy"), "--proxies",
            "--proxy_models", "7", "--tracking_uri", f"sqlite:///{evaluated / 'mlflow.db'}"]))
