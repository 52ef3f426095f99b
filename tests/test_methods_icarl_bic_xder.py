"""iCaRL, BiC and X-DER on the real digits data: herding and nearest-mean classification, the bias layer and
its fit, X-DER's logit updates, checkpoints, bad flags, and short runs through main.py."""
from __future__ import annotations

import io
import re
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

import continual.run
import main
from continual.args import parse_args
from continual.run import run as run_experiment
from models._contrastive import strong_augment, supcon_loss
from models._exemplars import herding
from models.bic import bias_correct
from tests.conftest import build_model, train_steps
from utils.errors import ConfigError


def stream(model, dataset, task: int, steps: int = 4) -> None:
    model.lifecycle.begin_task(task)
    train_steps(model, dataset, steps, task=task)
    model.lifecycle.end_task(task)


# ---------------------------------------------------------------------------------------------- iCaRL

def test_herding_follows_the_class_mean_not_the_nearest_examples():
    # 1-D features 0, 1, 2, 6, 10 (on a line in 2-D), mean 3.8. By hand, pick k minimises
    # |3.8 - (sum of the picked + x) / k|:
    #   k=1: |3.8 - x|            → 2  (1.8; 6 gives 2.2)
    #   k=2: |3.8 - (2 + x)/2|    → 6  (0.2)
    #   k=3: |3.8 - (8 + x)/3|    → 1  (0.8; 0 gives 1.13, 10 gives 2.2)
    #   k=4: |3.8 - (9 + x)/4|    → 10 (0.95; 0 gives 1.55)
    # Ranking by distance to the mean would take 0 (3.8 away) before 10 (6.2 away) instead.
    direction = torch.tensor([0.6, 0.8])
    features = torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0])[:, None] * direction
    assert herding(features, 4).tolist() == [2, 3, 1, 4]
    assert herding(features, 9).tolist() == [2, 3, 1, 4, 0]  # never more than there are
    nearest = (features - features.mean(0)).norm(dim=1).argsort()[:4]
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_icarl_keeps_herded_exemplars_balanced_over_the_classes_seen():
    model, dataset = build_model("--buffer_size", "20", model="icarl")
    stream(model, dataset, 0)
    first = {k: v.clone() for k, v in model.buffer.get_all().items()}
    assert first["labels"].tolist() == [0] * 10 + [1] * 10
    split = dataset.train_split(0)
    for c in (0, 1):
        rows = torch.nonzero(split.labels == c).flatten()
        expected = split.indices[rows[herding(model.normalized_features(split.images[rows]), 10)]]
        assert torch.equal(first["indices"][first["labels"] == c], expected)
    stream(model, dataset, 1)
    second = model.buffer.get_all()
    assert second["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    # Old classes keep the exemplars they picked first (the most representative).
    assert torch.equal(second["indices"][:5], first["indices"][:5])
    assert torch.equal(second["indices"][5:10], first["indices"][10:15])
    assert torch.equal(second["examples"], dataset.train.images[second["indices"]])
    assert torch.equal(second["task_labels"], second["labels"] // 2)
    # The next task trains on its own examples and every exemplar.
    assert len(model.training_data(2)) == len(dataset.train_split(2)) + 20


def test_icarl_classifies_by_the_nearest_mean_of_exemplars():
    model, dataset = build_model("--buffer_size", "20", model="icarl")
    stream(model, dataset, 0)
    stream(model, dataset, 1)
    images = dataset.test_transform(torch.cat([dataset.test_split(t).images for t in (0, 1)]))
    stored = model.buffer.get_all()
    model.eval()
    with torch.no_grad():
        exemplar_features = F.normalize(model.net.features(dataset.test_transform(stored["examples"])), dim=1)
        means = torch.stack([F.normalize(exemplar_features[stored["labels"] == c].mean(0), dim=0) for c in range(4)])
        features = F.normalize(model.net.features(images), dim=1)
        distances = torch.cdist(features, means).pow(2)
        out = model(images)
    assert torch.allclose(out[:, :4], -distances, atol=1e-5)
    assert torch.equal(out[:, :4].argmax(1), distances.argmin(1))
    assert torch.isneginf(out[:, 4:]).all()  # classes without exemplars are never predicted
    assert (out[:, :4].argmax(1) != model.net(images)[:, :4].argmax(1)).any()  # NME is not the network's argmax
    model.train()
    assert torch.equal(model(images), model.net(images))


def test_icarl_loss_is_bce_with_the_old_model_as_target_for_old_classes():
    model, dataset = build_model("--buffer_size", "20", "--wd_reg", "1e-3", model="icarl")
    stream(model, dataset, 0)
    model.lifecycle.begin_task(1)
    train_steps(model, dataset, 2, task=1)  # the network moves away from the copy distilled from
    split = dataset.train_split(1)
    x = dataset.test_transform(split.images[:16])
    loss = model.observe(x, split.labels[:16], split.images[:16], split.indices[:16], 1)
    with torch.no_grad():
        targets = F.one_hot(split.labels[:16], 10).float()
        targets[:, :2] = torch.sigmoid(model.old_net(x)[:, :2])
        expected = F.binary_cross_entropy_with_logits(model.net(x), targets)
        expected += 1e-3 * sum(p.pow(2).sum() for p in model.net.parameters())
    assert torch.allclose(loss, expected)
    assert not torch.allclose(model.old_net(x), model.net(x))


# ------------------------------------------------------------------------------------------------ BiC

def test_bic_bias_layer_rescales_only_the_newest_tasks_logits():
    model, dataset = build_model("--buffer_size", "20", model="bic")
    x = dataset.test_transform(dataset.test_split(0).images[:8])
    model.bias, model.bias_task = torch.tensor([0.5, 2.0]), 1  # β, α for classes 2 and 3
    with torch.no_grad():
        raw, out = model.net(x), model(x)
    assert torch.equal(out[:, [0, 1, 4, 5, 6, 7, 8, 9]], raw[:, [0, 1, 4, 5, 6, 7, 8, 9]])
    assert torch.allclose(out[:, 2:4], 2.0 * raw[:, 2:4] + 0.5)


def test_bic_holds_out_a_class_balanced_validation_set_that_stays_the_same():
    model, dataset = build_model("--buffer_size", "40", "--valset_split", "0.2", model="bic")
    stream(model, dataset, 0)
    assert model.buffer.get_all()["labels"].tolist() == [0] * 20 + [1] * 20
    train, val = model.validation_split(1)
    assert torch.bincount(val.labels, minlength=4).tolist() == [4, 4, 4, 4]  # round(0.2 · 40 / 2) per class
    everything = torch.cat([dataset.train_split(1).indices, model.buffer.get_all()["indices"]])
    assert sorted(torch.cat([train.indices, val.indices]).tolist()) == sorted(everything.tolist())
    again_train, again_val = model.validation_split(1)
    assert torch.equal(again_val.indices, val.indices) and torch.equal(again_train.indices, train.indices)
    assert torch.equal(model.training_data(1).indices, train.indices)
    assert torch.equal(train.images, dataset.train.images[train.indices])


def test_bic_loss_weighs_distillation_by_the_share_of_old_classes():
    model, dataset = build_model("--buffer_size", "20", "--temp", "2", model="bic")
    stream(model, dataset, 0)
    stream(model, dataset, 1)
    model.lifecycle.begin_task(2)
    assert model.old_bias is not None  # the correction fitted after task 1 now corrects the old model
    split = dataset.train_split(2)
    x, labels = dataset.test_transform(split.images[:16]), split.labels[:16]
    loss = model.observe(x, labels, split.images[:16], split.indices[:16], 2)
    with torch.no_grad():
        old = bias_correct(model.old_net(x), model.old_bias, range(2, 4))[:, :4]
        new = model.net(x)
        distill = -(F.softmax(old / 2, 1) * F.log_softmax(new[:, :4] / 2, 1)).sum(1).mean()
        expected = (1 - 4 / 6) * F.cross_entropy(new[:, :6], labels) + 4 / 6 * 4 * distill
    assert torch.allclose(loss, expected)


def test_bic_fitting_the_bias_does_not_raise_the_validation_loss():
    model, dataset = build_model("--buffer_size", "40", "--bic_epochs", "40", "--batch_size", "8", model="bic")
    stream(model, dataset, 0)
    model.lifecycle.begin_task(1)
    train_steps(model, dataset, 8, task=1)
    val = model.validation_split(1)[1]  # what end_task fits the bias on (the buffer changes after)
    model.lifecycle.end_task(1)
    assert model.bias_task == 1 and not torch.equal(model.bias, torch.tensor([0.0, 1.0]))
    model.eval()
    with torch.no_grad():
        logits = model.net(dataset.test_transform(val.images))
        before = F.cross_entropy(logits[:, :4], val.labels)
        after = F.cross_entropy(model(dataset.test_transform(val.images))[:, :4], val.labels)
    assert after < before
    record = model.task_record(1)["metrics"]
    assert record["bic_val_loss_before"] == pytest.approx(before.item(), rel=1e-5)
    assert record["bic_val_loss_after"] == pytest.approx(after.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- X-DER

def test_xder_update_logits_transplants_heads_scaled_below_the_true_logit():
    model, _ = build_model("--buffer_size", "20", "--gamma", "0.85", model="xder")
    old = torch.tensor([[4.0, 1.0] + [0.0] * 8, [1.0, 10.0] + [0.0] * 8])
    new = torch.tensor([[9.0, 9.0, 8.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, 3.0]] * 2)
    updated = model.update_logits(old, new, torch.tensor([0, 1]), first_task=1, n_heads=4)
    # Row 0: the heads' maximum 8 exceeds the true logit 4, so they are scaled by 0.85 · 4 / 8 = 0.425.
    assert torch.allclose(updated[0], torch.tensor([4.0, 1.0, 3.4, 0.85, 0.425, 0.425, 0.0, 0.0, -0.425, 1.275]))
    # Row 1: the true logit 10 is above the heads' maximum, so they are copied as they are.
    assert torch.allclose(updated[1], torch.tensor([1.0, 10.0, 8.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, 3.0]))
    assert torch.equal(old[0, 2:], torch.zeros(8))  # the inputs are left alone


CONSTANT = torch.tensor([6.0, 3.0, 8.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, 3.0])


def constant_network(model) -> None:
    """Make the network output CONSTANT for every input."""
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.copy_(CONSTANT)


def past_logits(rows: int) -> torch.Tensor:
    """Stored logits of the class-0 rows then the class-1 rows, 4 and 10 for the true class."""
    half = rows // 2
    return torch.cat([torch.tensor([[4.0, 1.0] + [0.0] * 8] * half), torch.tensor([[1.0, 10.0] + [0.0] * 8] * half)])


# The expected logits of the old rows after task 1 updated them from CONSTANT: heads 1-4 from the network,
# scaled by 0.85 · 4 / 8 for class 0 (8 > 4), unchanged for class 1 (8 < 10).
CLASS0 = torch.tensor([4.0, 1.0, *(0.85 * 4 / 8 * CONSTANT[2:]).tolist()])
CLASS1 = torch.tensor([1.0, 10.0, *CONSTANT[2:].tolist()])


def test_xder_end_of_task_update_writes_the_expected_logits_into_the_buffer():
    model, dataset = build_model("--buffer_size", "20", model="xder")
    stream(model, dataset, 0)
    before = {k: v.clone() for k, v in model.buffer.get_all().items()}
    assert before["labels"].tolist() == [0] * 10 + [1] * 10
    model.buffer.logits[:20] = past_logits(20)
    constant_network(model)
    model.update_counter[:] = 3
    model.lifecycle.end_task(1)
    after = model.buffer.get_all()
    assert after["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert torch.equal(after["indices"][:5], before["indices"][:5])  # old classes keep their first exemplars
    assert torch.equal(after["indices"][5:10], before["indices"][10:15])
    assert torch.allclose(after["logits"][:5], CLASS0.expand(5, -1))
    assert torch.allclose(after["logits"][5:10], CLASS1.expand(5, -1))
    # New rows store the network's logits with the past head kept under the true one: class 2's logit 8
    # beats the past maximum 6 (unchanged); class 3's logit 2 does not, so the past head is scaled by 0.85 · 2 / 6.
    assert torch.allclose(after["logits"][10:15], CONSTANT.expand(5, -1))
    class3 = torch.cat([0.85 * 2 / 6 * CONSTANT[:2], CONSTANT[2:]])
    assert torch.allclose(after["logits"][15:], class3.expand(5, -1))
    assert after["task_labels"].tolist() == [1] * 20
    assert torch.equal(after["examples"], dataset.train.images[after["indices"]])
    assert model.update_counter.sum() == 0


def test_xder_replay_updates_past_logits_on_their_first_draw():
    model, dataset = build_model("--buffer_size", "20", "--minibatch_size", "20", model="xder")
    stream(model, dataset, 0)
    model.buffer.logits[:20] = past_logits(20)
    constant_network(model)
    model.lifecycle.begin_task(1)
    split = dataset.train_split(1)
    model.observe(dataset.test_transform(split.images[:8]), split.labels[:8], split.images[:8], split.indices[:8], 1)
    # Every slot was drawn (a replay batch as large as the buffer) for the first time, so every one is updated.
    assert model.update_counter.tolist() == [1.0] * 20
    assert torch.allclose(model.buffer.logits[:10], CLASS0.expand(10, -1))
    assert torch.allclose(model.buffer.logits[10:20], CLASS1.expand(10, -1))


def test_xder_future_constraint_is_a_hinge_on_the_future_heads():
    model, _ = build_model("--buffer_size", "20", "--constr_eta", "0.5", "--constr_margin", "1", model="xder")
    # Task 1: own head = classes 2-3, future heads = classes 4-9.
    outputs = torch.tensor([[0.0, 0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # 2 + 1 - 5 < 0: satisfied
                            [0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.5]])  # 3 + 1 - 1 = 3: violated
    assert model.future_constraint(outputs, None, 1).item() == pytest.approx(0.5 * 3)
    assert model.future_constraint(outputs[:1], None, 1).item() == 0.0


def test_the_consistency_loss_is_supervised_contrastive_over_views():
    # Two examples, two identical views each, orthogonal unit features, temperature 1. An anchor's logits
    # are 1 (its other view) and 0, 0 (the other example's views): log p(other view) = 1 - log(e + 2).
    features = torch.tensor([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2])
    assert supcon_loss(features, torch.tensor([0, 1]), 1.0).item() == pytest.approx(2 * (math.log(math.e + 2) - 1))
    # Same label: all three others are positives, log-probabilities 1 - log(e + 2), -log(e + 2), -log(e + 2).
    same = supcon_loss(features, torch.tensor([3, 3]), 1.0).item()
    assert same == pytest.approx(2 * (math.log(math.e + 2) - 1 / 3))
    views = strong_augment(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3)
    assert views.shape == (4, 3, 16, 16) and views.min() >= -2 and views.max() <= 2  # (x - 0.5) / 0.25, x in [0, 1]


# ------------------------------------------------------------------------------ checkpoints and flags

@pytest.mark.parametrize("name", ["icarl", "bic", "xder"])
def test_a_restored_model_continues_exactly(name):
    flags = ["--buffer_size", "20", "--bic_epochs", "5"] if name == "bic" else ["--buffer_size", "20"]
    model, dataset = build_model(*flags, model=name)
    stream(model, dataset, 0)
    stream(model, dataset, 1)
    saved = io.BytesIO()
    torch.save(model.checkpoint_state(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # as a checkpoint is read
    restored, _ = build_model(*flags, "--seed", "1", model=name)
    restored.load_checkpoint_state(state)
    images = dataset.test_transform(dataset.test_split(1).images)
    for m in (model, restored):
        m.eval()
    assert torch.equal(model(images), restored(images))
    split = dataset.train_split(2)
    losses = []
    for m in (model, restored):
        m.train()
        m.lifecycle.begin_task(2)
        torch.manual_seed(5)
        x = dataset.train_transform(split.images[:16])
        losses.append(m.observe(x, split.labels[:16], split.images[:16], split.indices[:16], 2))
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("argv, sentence", [
    (["--model", "icarl", "--buffer_size", "5"], "at least the 10 classes"),
    (["--model", "icarl", "--buffer_size", "50", "--optim_wd", "0.001"], "pass --optim_wd 0 and --wd_reg 0.001"),
    (["--model", "bic", "--buffer_size", "50", "--dataset", "perm-digits"], "class-incremental"),
    (["--model", "bic", "--buffer_size", "50", "--valset_split", "0"],
     "--valset_split must be in (0, 1) (declared by the model bic), got 0.0; pass a value in that range"),
    (["--model", "bic", "--buffer_size", "50", "--temp", "0"],
     "--temp must be in (0, inf) (declared by the model bic), got 0.0"),
    (["--model", "icarl", "--buffer_size", "50", "--wd_reg=-1"],
     "--wd_reg must be in [0, inf) (declared by the model icarl), got -1.0"),
    (["--model", "xder", "--buffer_size", "50", "--simclr_num_aug", "1"],
     "--simclr_num_aug must be in [2, inf) (declared by the model xder), got 1"),
    (["--model", "xder", "--buffer_size", "50", "--buffer_policy", "class_balanced"], "leave --buffer_policy"),
    (["--model", "xder", "--buffer_size", "50", "--gamma", "-1"],
     "--gamma must be in [0, inf) (declared by the model xder), got -1.0"),
])
def test_impossible_flags_are_refused_in_one_sentence(argv, sentence):
    with pytest.raises(ConfigError, match=re.escape(sentence)):
        parse_args([*argv, "--lr", "0.1", "--device", "cpu"])


# ------------------------------------------------------------------------------------ runs end to end

@pytest.fixture(scope="module")
def shared_tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the runs below: creating a store costs more than a short run."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("name, extra", [("icarl", []), ("bic", ["--bic_epochs", "20"]),
                                         ("xder", ["--simclr_num_aug", "2", "--simclr_batch_size", "16"])])
def test_a_short_run_completes_with_accuracies_in_range(shared_tracking_uri, name, extra):
    code = main.main(["--dataset", "seq-digits", "--model", name, "--buffer_size", "30", "--lr", "0.1",
                      "--n_epochs", "1", "--seed", "0", "--non_verbose", "--tracking_uri", shared_tracking_uri,
                      "--run_name", f"short-{name}", *extra])
    assert code == 0
    client = MlflowClient(shared_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id],
                                filter_string=f"attributes.run_name = 'short-{name}'")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for setting in ("class_il", "task_il"):
        accuracies = [metrics[f"acc_{setting}_per_task/task_{t}"] / 100 for t in range(1, 6)]
        assert all(0 <= a <= 1 for a in accuracies) and math.isfinite(metrics[f"acc_{setting}"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc_class_il")] == [1, 2, 3, 4, 5]
    if name == "bic":
        assert metrics["model/bic_val_loss_after"] <= metrics["model/bic_val_loss_before"]


def test_bic_resumes_from_a_checkpoint_to_the_uninterrupted_result(shared_tracking_uri, tmp_path, monkeypatch):
    argv = ["--model", "bic", "--buffer_size", "30", "--bic_epochs", "5", "--lr", "0.1", "--n_epochs", "1",
            "--seed", "0", "--non_verbose", "--tracking_uri", shared_tracking_uri]
    uninterrupted = run_experiment(parse_args(argv))
    real_save = continual.run.save_checkpoint

    def save_then_stop(path, payload):
        real_save(path, payload)
        if payload["next_task"] == 2:
            raise KeyboardInterrupt  # as if killed right after the checkpoint of task 2 (old model and bias in it)

    monkeypatch.setattr(continual.run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_args([*argv, "--savecheck", "--checkpoint_dir", str(tmp_path)]))
    monkeypatch.setattr(continual.run, "save_checkpoint", real_save)
    (checkpoint,) = tmp_path.glob("*.pt")
    resumed = run_experiment(parse_args([*argv, "--resume", str(checkpoint)]))
    for setting in ("class_il", "task_il"):
        np.testing.assert_array_equal(resumed.matrices[setting], uninterrupted.matrices[setting])
