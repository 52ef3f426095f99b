"""Many models at once: an ensemble of any backbone (BatchNorm included) trains each model as it would be
trained alone, and a model's stored file is the same bytes whatever was interrupted and whichever launcher
retrained it. On tiny CIFAR-10 files in the release format, with the dataset's crop and flip."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_splits
from memorization.driver import make_plan, run_plan
from memorization.store import SubsetStore
from memorization.training import TrainingInputs, build_backbones, load_plan_data, recipe, train_group
from tests.conftest import REPO_ROOT
from utils.optimizers import build_optimizer, build_schedule

N_PER_BATCH = 24  # 5 training batches: 120 training and 24 test images


@pytest.fixture(scope="module")
def cifar_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, N_PER_BATCH)
        # Learnable: a class lights up its own band of rows, plus noise.
        images = rng.integers(0, 60, (N_PER_BATCH, 3, 32, 32))
        for row, c in enumerate(labels):
            images[row, :, 3 * c:3 * c + 3] += 150
        (folder / name).write_bytes(pickle.dumps({"data": images.astype(np.uint8).reshape(N_PER_BATCH, -1),
                                                  "labels": labels.tolist()}))
    return root


def plan_args(cifar_path, out, *extra):
    return train_splits.parse_args(["--dataset", "seq-cifar10", "--data_path", str(cifar_path), "--n_models", "4",
                                    "--n_epochs", "2", "--batch_size", "32", "--lr", "0.02", "--subset_ratio", "0.5",
                                    "--out", str(out), "--non_verbose", *extra])


def trained_alone(plan, model_id: int, data) -> dict[str, np.ndarray]:
    """The straightforward loop: one network, its own optimizer, no torch.func."""
    training = recipe(plan.settings["training"])
    (net,) = build_backbones(plan, [model_id], data, "cpu")
    optimizer = build_optimizer(net.parameters(), training)
    subset = torch.as_tensor(plan.inclusion_mask[model_id]).nonzero()[:, 0]
    order_generator = torch.Generator().manual_seed(int(plan.model_seed[model_id]) + 1)
    augment_generator = torch.Generator().manual_seed(int(plan.model_seed[model_id]) + 2)
    steps = -(-len(subset) // training.batch_size)
    schedule = build_schedule(optimizer, training.lr_schedule, steps, training.n_epochs, training.lr_milestones,
                              training.lr_warmup)
    for _ in range(training.n_epochs):
        rows = subset[torch.randperm(len(subset), generator=order_generator)]
        for start in range(0, len(rows), training.batch_size):
            batch = rows[start:start + training.batch_size]
            x = data.dataset.train_transform(data.train_images[batch], augment_generator)
            loss = F.cross_entropy(net(x), data.train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        logits = net(data.dataset.test_transform(data.train_images))
    return {"prob_train": logits.softmax(1).gather(1, data.train_labels[:, None])[:, 0].numpy(),
            "running_mean": [b.clone() for n, b in net.named_buffers() if n.endswith("running_mean")]}


@pytest.mark.parametrize("backbone", [["--backbone", "resnet18", "--resnet_width", "4"],
                                      pytest.param(["--backbone", "reduced_resnet18"], marks=pytest.mark.slow),
                                      ["--backbone", "airbench", "--airbench_width", "0.125"],
                                      ["--backbone", "vit", "--vit_depth", "1", "--vit_width", "16",
                                       "--vit_heads", "2", "--vit_patch", "8"],
                                      ["--backbone", "mlp", "--mlp_hidden", "32"],
                                      # a warm-up without a schedule: the only rate that changes then
                                      ["--backbone", "mlp", "--mlp_hidden", "32", "--lr_schedule", "none",
                                       "--lr_warmup", "0.9"]])
def test_an_ensemble_trains_each_model_as_it_would_be_trained_alone(cifar_path, tmp_path, backbone):
    torch.set_num_threads(1)
    plan = make_plan(plan_args(cifar_path, tmp_path / "store", "--n_epochs", "1", "--lr_schedule", "cosine",
                               *backbone))
    data = load_plan_data(plan, str(cifar_path), "cpu")
    together = train_group(plan, [0, 1, 2], data, "cpu")
    for model_id in (0, 1, 2):
        alone = trained_alone(plan, model_id, data)
        ensemble_prob = together[model_id]["prob_train"][-1].astype(np.float32)
        # Stored probabilities are float16: equal up to its rounding and to float32 kernel differences.
        np.testing.assert_allclose(ensemble_prob, alone["prob_train"], atol=2e-3)
        assert not np.allclose(ensemble_prob, together[(model_id + 1) % 3]["prob_train"][-1], atol=1e-4)


def model_bytes(store) -> dict[int, bytes]:
    return {m: SubsetStore(store).model_path(m).read_bytes() for m in range(4)}


@pytest.mark.slow
def test_a_model_file_is_the_same_bytes_after_a_kill_a_damaged_file_and_another_launcher(cifar_path, tmp_path,
                                                                                        ray_cluster):
    common = ["--backbone", "resnet18", "--resnet_width", "4", "--ensemble", "2", "--n_epochs", "3"]
    reference = tmp_path / "reference"
    run_plan(plan_args(cifar_path, reference, *common, "--tracking_uri", f"sqlite:///{tmp_path / 'a.db'}"))
    expected = model_bytes(reference)
    assert len(set(expected.values())) == 4

    # A real kill as soon as the first group is stored, then a resume on a process pool.
    store = tmp_path / "store"
    argv = [sys.executable, "train_splits.py", "--dataset", "seq-cifar10", "--data_path", str(cifar_path),
            "--n_models", "4", "--batch_size", "32", "--lr", "0.02", "--subset_ratio", "0.5", "--out", str(store),
            "--non_verbose", "--tracking_uri", f"sqlite:///{tmp_path / 'b.db'}", *common]
    process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 120
    while not list((store / "models").glob("model_*.npz")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stored = sorted(p.name for p in (store / "models").glob("model_*.npz"))
    assert 1 <= len(stored) < 4, "the run finished before it could be killed"
    run_plan(plan_args(cifar_path, store, *common, "--launcher", "pool", "--workers", "2",
                       "--tracking_uri", f"sqlite:///{tmp_path / 'b.db'}"))
    assert model_bytes(store) == expected

    # A damaged file: its group is retrained whole, here on Ray, and every file is the same bytes again.
    path = SubsetStore(store).model_path(3)
    path.write_bytes(path.read_bytes()[:100])
    result = run_plan(plan_args(cifar_path, store, *common, "--launcher", "ray", "--address", ray_cluster,
                                "--tracking_uri", f"sqlite:///{tmp_path / 'b.db'}"))
    assert result["trained"] == 2  # models 2 and 3: the group of the damaged file
    assert model_bytes(store) == expected


def test_another_group_size_on_an_existing_store_is_refused_and_nothing_is_lost(cifar_path, tmp_path, capsys):
    store = tmp_path / "store"
    common = ["--backbone", "mlp", "--mlp_hidden", "16", "--n_epochs", "1"]
    run_plan(plan_args(cifar_path, store, *common, "--ensemble", "2", "--tracking_uri", f"sqlite:///{tmp_path / 'a.db'}"))
    before = model_bytes(store)
    code = train_splits.main(["--dataset", "seq-cifar10", "--data_path", str(cifar_path), "--n_models", "4",
                              "--batch_size", "32", "--lr", "0.02", "--subset_ratio", "0.5", "--out", str(store),
                              "--non_verbose", *common, "--ensemble", "4"])
    assert code == 2
    assert "already holds another subset-training plan" in capsys.readouterr().err
    assert model_bytes(store) == before


@pytest.mark.parametrize("argv, sentence", [
    (["--lr_milestones", "0.5,1.5"], "--lr_milestones are fractions of the epochs, each strictly between 0 and 1"),
    (["--config", "configs/splits/memorization_cl_cifar100.yaml"],
     "is a recipe for seq-cifar100, not seq-cifar10; pass the recipe of seq-cifar10 or drop --dataset"),
    (["--lr_warmup", "1.5"], "--lr_warmup is a fraction in [0, 1), got 1.5"),
])
def test_bad_recipe_input_ends_with_one_sentence(cifar_path, tmp_path, capsys, argv, sentence):
    code = train_splits.main(["--dataset", "seq-cifar10", "--data_path", str(cifar_path), "--lr", "0.1",
                              "--out", str(tmp_path / "store"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert sentence in err and len(err.splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_an_unknown_schedule_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_splits.parse_args(["--lr", "0.1", "--lr_schedule", "step", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "invalid choice: 'step' (choose from 'none', 'multistep', 'cosine', 'onecycle')" in capsys.readouterr().err


def test_learning_rate_schedules_follow_their_rules():
    def rates(schedule: str, warmup: float = 0.0) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = build_schedule(optimizer, schedule, steps_per_epoch=2, n_epochs=10, milestones=[0.7, 0.9],
                                   warmup=warmup)
        out = []
        for _ in range(20):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    multistep = rates("multistep")  # MultiStepLR(milestones=[7, 9]) stepped once per epoch of 2 steps
    assert multistep == pytest.approx([0.1] * 14 + [0.01] * 4 + [0.001] * 2)
    cosine = rates("cosine")
    assert cosine[0] == pytest.approx(0.1) and cosine[10] == pytest.approx(0.05) and cosine[19] < 0.001
    onecycle = rates("onecycle", warmup=0.25)  # 5 warm-up steps to 0.1, then linear to 0 over the other 15
    assert onecycle[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert onecycle[5:] == pytest.approx([0.1 * (1 - k / 15) for k in range(15)])
    assert rates("none") == pytest.approx([0.1] * 20)


def test_stratified_subsets_hold_each_class_at_the_ratio_and_balance_inclusion(cifar_path, tmp_path):
    plan = make_plan(plan_args(cifar_path, tmp_path, "--split_sampling", "stratified", "--n_models", "6"))
    labels = load_plan_data(plan, str(cifar_path), "cpu").train_labels.numpy()
    for mask in plan.inclusion_mask:
        for c in np.unique(labels):
            assert mask[labels == c].sum() == round(0.5 * (labels == c).sum())
    counts = plan.inclusion_mask.sum(0)
    for c in np.unique(labels):  # balanced within a class (a class of odd size has its own rate)
        assert np.ptp(counts[labels == c]) <= 1


def test_the_stacked_mlp_path_matches_the_vmapped_one(cifar_path, tmp_path, monkeypatch):
    from memorization import training

    plan = make_plan(plan_args(cifar_path, tmp_path, "--backbone", "mlp", "--mlp_hidden", "64,32"))
    data = load_plan_data(plan, str(cifar_path), "cpu")
    stacked = train_group(plan, [0, 1, 2, 3], data, "cpu")
    assert isinstance(training.build_ensemble(training.build_backbones(plan, [0, 1], data, "cpu"),
                                              training.recipe(plan.settings["training"])), training.StackedMLP)
    monkeypatch.setattr(training, "build_ensemble", training.Ensemble)
    vmapped = train_group(plan, [0, 1, 2, 3], data, "cpu")
    for m in range(4):
        np.testing.assert_allclose(stacked[m]["prob_train"].astype(np.float32),
                                   vmapped[m]["prob_train"].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("dataset", ["seq-digits", "seq-cifar10"])
def test_each_step_gets_its_rows_transformed_as_alone(cifar_path, tmp_path, dataset):
    """A step's inputs are model k's rows through the training transform, with k's own random draws (CIFAR's
    crop and flip), or gathered from the images transformed once (digits, by the CPU's kernel into tensors kept
    from step to step); its labels are those rows' labels; the last step has 1 row."""
    plan = make_plan(train_splits.parse_args(["--dataset", dataset, "--data_path", str(cifar_path), "--n_models", "3",
                                              "--lr", "0.1", "--out", str(tmp_path), "--non_verbose"]))
    data = load_plan_data(plan, str(cifar_path), "cpu")
    rows = torch.stack([torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(k))[:41]
                        for k in range(3)])
    seeds = [torch.Generator().manual_seed(k) for k in range(3)]
    inputs = TrainingInputs(data, [torch.Generator().manual_seed(k) for k in range(3)])
    assert inputs.kernel == (dataset == "seq-digits")
    shapes = []
    for _ in range(2):  # a second epoch reuses the kept tensors
        for i, (x, y) in enumerate(inputs.epoch(rows, 4)):  # each step checked before the next overwrites it
            shapes.append(tuple(x.shape[:2]))
            assert torch.equal(y, data.train_labels[rows[:, 4 * i:4 * i + 4]])
            for k in range(3):
                expected = data.dataset.train_transform(data.train_images[rows[k, 4 * i:4 * i + 4]], seeds[k])
                assert torch.equal(x[k], expected)
    assert shapes == ([(3, 4)] * 10 + [(3, 1)]) * 2
