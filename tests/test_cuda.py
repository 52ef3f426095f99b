"""The CUDA paths of subset training (bf16 autocast, device-resident data, vmapped ensembles of BatchNorm
networks), run with `pytest -m cuda` on a machine with a GPU and skipped elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memorization.driver import make_plan, run_plan
from memorization.store import SubsetStore
from memorization.training import load_plan_data, train_group
from tests.test_split_ensembles import cifar_path, plan_args  # noqa: F401  (cifar_path is a fixture)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_plan_data_stay_on_the_gpu(cifar_path, tmp_path):
    plan = make_plan(plan_args(cifar_path, tmp_path, "--backbone", "airbench", "--airbench_width", "0.25"))
    data = load_plan_data(plan, str(cifar_path), "cuda")
    assert data.train_images.device.type == "cuda" and data.train_images.dtype == torch.uint8
    assert data.test_labels.device.type == "cuda"


@pytest.mark.parametrize("backbone", [["--backbone", "resnet18", "--resnet_width", "8"],
                                      ["--backbone", "airbench", "--airbench_width", "0.25"]])
def test_a_bf16_ensemble_on_the_gpu_matches_its_models_trained_alone(cifar_path, tmp_path, backbone):
    plan = make_plan(plan_args(cifar_path, tmp_path, "--n_epochs", "1", *backbone))
    data = load_plan_data(plan, str(cifar_path), "cuda")
    together = train_group(plan, [0, 1, 2, 3], data, "cuda")
    for model_id in (0, 3):
        alone = train_group(plan, [model_id], data, "cuda")[model_id]
        # bf16 rounds differently in a batched kernel: equal to a few hundredths of probability.
        np.testing.assert_allclose(together[model_id]["prob_train"].astype(np.float32),
                                   alone["prob_train"].astype(np.float32), atol=0.05)
        assert (together[model_id]["correct_train"] == alone["correct_train"]).mean() > 0.9


def test_train_splits_on_the_gpu_stores_every_model(cifar_path, tmp_path):
    store = tmp_path / "store"
    result = run_plan(plan_args(cifar_path, store, "--backbone", "resnet18", "--resnet_width", "8", "--ensemble",
                                "4", "--device", "cuda", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"))
    assert result["trained"] == 4
    plan = SubsetStore(store).load_plan()
    assert SubsetStore(store).finished_models(plan)[0] == [0, 1, 2, 3]
