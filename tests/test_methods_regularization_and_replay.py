"""ER-ACE, A-GEM, GDumb, LwF, online EWC and SI on the real digits data, each against a computation by hand:
the masked stream loss, the projected gradient, the class-balanced memory and the refit from scratch, the
distillation term and its gradient, the Fisher and the penalty gradient, the path integral."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.args import parse_args
from datasets import DATASETS
from models.agem import project
from models.ewc_on import fisher_diagonal
from models.si import SI
from tests.conftest import build_model, train_steps
from utils.errors import ConfigError


def batch(dataset, task: int, rows, transform=None):
    """(inputs, labels, raw images, indices) of rows of a task's training split, unaugmented by default."""
    split = dataset.train_split(task)
    rows = torch.as_tensor(rows)
    raw = split.images[rows]
    return (transform or dataset.test_transform)(raw), split.labels[rows], raw, split.indices[rows]


def flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


# ---------------------------------------------------------------------------------------------- ER-ACE

def test_er_ace_stream_loss_is_the_cross_entropy_over_the_batch_classes_and_the_classes_to_come():
    model, dataset = build_model("--buffer_size", "60", model="er_ace")
    inputs, labels, raw, indices = batch(dataset, 0, range(32))
    with torch.no_grad():
        logits = model.net(inputs)
    # First task: no mask, no replay (Mammoth's er_ace without --task_free).
    loss = model.observe(inputs, labels, raw, indices, 0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    train_steps(model, dataset, 5, task=0)
    train_steps(model, dataset, 5, task=1)

    # Task 2 (classes 4, 5): a batch of class 5 alone keeps the logits of 5..9 (5 is the largest label seen) and
    # masks 0..4, class 4 too; a later batch of class 4 alone keeps 4 (present) and 5..9 (from the largest on).
    split = dataset.train_split(2)
    for label, kept in ((5, [5, 6, 7, 8, 9]), (4, [4, 5, 6, 7, 8, 9])):
        inputs, labels, raw, indices = batch(dataset, 2, torch.nonzero(split.labels == label).flatten()[:16])
        with torch.no_grad():
            logits = model.net(inputs)
        by_hand = -F.log_softmax(logits[:, kept], dim=1)[:, kept.index(label)].mean()
        buffer_before = copy.deepcopy(model.buffer)
        torch.manual_seed(11)
        loss = model.observe(inputs, labels, raw, indices, 2)
        torch.manual_seed(11)  # the same replay batch, drawn from the buffer as it was before this batch joined it
        replay = buffer_before.get_data(model.args.minibatch_size, transform=dataset.train_transform)
        with torch.no_grad():
            replay_loss = F.cross_entropy(model.net(replay["examples"]), replay["labels"])  # over all ten classes
            torch.testing.assert_close(model.stream_loss(logits, labels, 2), by_hand)
        torch.testing.assert_close(loss.detach(), by_hand + replay_loss)
    assert model.seen.tolist() == [True] * 6 + [False] * 4


def test_er_ace_default_head_is_the_cosine_classifier():
    model, dataset = build_model("--buffer_size", "10", model="er_ace")
    head = model.net.head
    inputs = batch(dataset, 0, range(8))[0]
    features = model.net.features(inputs)
    cosine = F.normalize(features, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(model.net(inputs), 10 * cosine, rtol=1e-4, atol=1e-4)
    assert not any(name.endswith("bias") for name, _ in head.named_parameters())
    plain, _ = build_model("--buffer_size", "10", "--use_custom_classifier", "0", model="er_ace")
    assert isinstance(plain.net.head, nn.Linear)


# ----------------------------------------------------------------------------------------------- A-GEM

def test_agem_memory_holds_an_equal_share_of_each_finished_task():
    model, dataset = build_model("--buffer_size", "50", model="agem")
    for task in range(2):
        train_steps(model, dataset, 2, task=task)
        model.lifecycle.end_task(task)
    stored = model.buffer.get_all()
    assert len(stored["labels"]) == 2 * (50 // 5)
    assert torch.equal(stored["task_labels"], torch.tensor([0] * 10 + [1] * 10))
    assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
    assert torch.equal(stored["labels"] // 2, stored["task_labels"])


def test_agem_projects_a_conflicting_gradient_onto_the_memory_gradients_half_space():
    model, dataset = build_model("--buffer_size", "50", "--lr", "0.1", model="agem")
    train_steps(model, dataset, 9, task=0)
    model.lifecycle.end_task(0)
    params = list(model.net.parameters())
    projected = kept = 0
    for step in range(9):
        inputs, labels, raw, indices = batch(dataset, 1, range(step * 32, step * 32 + 32))
        loss = model.observe(inputs, labels, raw, indices, 1)
        model.opt.zero_grad(set_to_none=True)
        loss.backward()
        g = flat_grads(params)
        torch.manual_seed(step)
        model.after_backward(1)
        edited = flat_grads(params)
        torch.manual_seed(step)  # the same memory batch, by hand
        replay = model.buffer.get_data(model.args.minibatch_size, transform=dataset.train_transform)
        g_ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            F.cross_entropy(model.net(replay["examples"]), replay["labels"]), params)])
        if torch.dot(g, g_ref) < 0:
            projected += 1
            torch.testing.assert_close(edited, g - torch.dot(g, g_ref) / torch.dot(g_ref, g_ref) * g_ref)
            assert abs(torch.dot(edited, g_ref)) <= 1e-5 * g.norm() * g_ref.norm()
        else:
            kept += 1
            assert torch.equal(edited, g)
        model.opt.step()
    assert projected > 0  # new classes pull against the memory's at least once
    g, g_ref = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -1.0])
    assert torch.equal(project(g, -g_ref), g) and torch.allclose(project(g, g_ref), torch.tensor([1.5, 1.5]))


# ----------------------------------------------------------------------------------------------- GDumb

def stream_into_memory(model, dataset, task: int) -> None:
    split = dataset.train_split(task)
    for start in range(0, len(split), 32):
        rows = range(start, min(start + 32, len(split)))
        assert model.observe(*batch(dataset, task, rows, dataset.train_transform), task) is None


def test_gdumb_memory_is_class_balanced_and_holds_the_dataset_rows():
    model, dataset = build_model("--buffer_size", "30", "--n_epochs", "1", model="gdumb")
    expected_counts = {0: [15, 15], 1: [7, 8], 2: [5, 5]}
    for task in range(3):
        stream_into_memory(model, dataset, task)
        stored = model.buffer.get_all()
        counts = torch.bincount(stored["labels"], minlength=2 * task + 2).tolist()
        assert sum(counts) == 30 and len(counts) == 2 * task + 2
        assert min(counts) == expected_counts[task][0] and max(counts) == expected_counts[task][1]
        assert counts == model.buffer.policy.class_counts()
        assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
        assert torch.equal(stored["labels"], dataset.train.labels[stored["indices"]])
        assert len(set(stored["indices"].tolist())) == 30


def test_gdumb_refits_from_a_fresh_initialisation_on_the_memory_alone():
    model, dataset = build_model("--buffer_size", "40", "--n_epochs", "1", "--fitting_epochs", "32", "--maxlr", "0.2",
                                 "--cutmix_alpha", "1", model="gdumb")
    for task in range(2):
        stream_into_memory(model, dataset, task)
    other = copy.deepcopy(model)
    with torch.no_grad():  # the same memory, a very different network to start from
        for p in other.net.parameters():
            p.add_(torch.randn_like(p) * 5)
    torch.manual_seed(3)
    model.lifecycle.end_task(1)
    torch.manual_seed(3)
    other.end_task(1)
    for a, b in zip(model.net.state_dict().values(), other.net.state_dict().values()):
        torch.testing.assert_close(a, b)
    stored, test = model.buffer.get_all(), dataset.test
    seen = test.labels < 4
    model.net.eval()
    with torch.no_grad():
        fitted = (model.net(dataset.test_transform(stored["examples"])).argmax(1) == stored["labels"]).float().mean()
        tested = (model.net(dataset.test_transform(test.images[seen])).argmax(1) == test.labels[seen]).float().mean()
    assert fitted >= 0.9 and tested >= 0.6  # 40 examples of four classes; chance is 0.25


# ------------------------------------------------------------------------------------------------- LwF

def test_lwf_distillation_is_zero_right_after_the_previous_task_and_has_mammoths_gradient():
    model, dataset = build_model("--alpha", "1.5", "--softmax_temp", "2", "--n_epochs", "2", model="lwf")
    inputs, labels, raw, indices = batch(dataset, 0, range(32))
    with torch.no_grad():
        torch.testing.assert_close(model.observe(inputs, labels, raw, indices, 0),
                                   F.cross_entropy(model.net(inputs)[:, :2], labels))  # seen classes only
    train_steps(model, dataset, 9, task=0)
    model.lifecycle.end_task(0)
    inputs, labels, raw, indices = batch(dataset, 1, range(64))
    with torch.no_grad():
        before = model.net(inputs)
    head_before = copy.deepcopy(model.net.head.state_dict())
    model.lifecycle.begin_task(1)
    with torch.no_grad():
        after = model.net(inputs)
    torch.testing.assert_close(after[:, :2], before[:, :2])  # the warm-up moved the new classes' rows only
    assert not torch.allclose(after[:, 2:4], before[:, 2:4])
    torch.testing.assert_close(model.net.head.weight[:2], head_before["weight"][:2])
    with torch.no_grad():
        loss = model.observe(inputs, labels, raw, indices, 1)
        assert abs(model.distillation(after, model.old_logits[model.row_of[indices]])) < 1e-6
    torch.testing.assert_close(loss, F.cross_entropy(after[:, :4], labels))

    train_steps(model, dataset, 4, task=1)
    outputs = model.net(inputs)
    old = model.old_logits[model.row_of[indices]]

    def smooth(p, temp):  # Mammoth's lwf
        p = p ** (1 / temp)
        return p / p.sum(1, keepdim=True)

    old_p, new_p = smooth(F.softmax(old[:, :2], 1), 2.0), smooth(F.softmax(outputs[:, :2], 1), 2.0)
    mammoth = -(old_p * torch.log(new_p)).sum(1).mean()
    ours = model.distillation(outputs, old)
    entropy = -(old_p * torch.log(old_p)).sum(1).mean()
    torch.testing.assert_close(ours, mammoth - entropy)
    params = list(model.net.parameters())
    for a, b in zip(torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True),
                    torch.autograd.grad(mammoth, params, allow_unused=True)):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ online EWC

def test_ewc_on_fisher_and_penalty_gradient_match_a_hand_computation():
    model, dataset = build_model("--e_lambda", "3", "--gamma", "0.5", model="ewc_on")
    params = list(model.net.parameters())
    train_steps(model, dataset, 5, task=0)
    model.lifecycle.end_task(0)
    split = dataset.train_split(0)
    by_hand = [torch.zeros_like(p) for p in params]
    model.net.eval()
    for image, label in zip(dataset.train_transform(split.images), split.labels):  # one example at a time
        log_p = F.log_softmax(model.net(image[None]), dim=1)[0, label]
        for total, g in zip(by_hand, torch.autograd.grad(log_p, params)):
            total += log_p.exp().detach() * g ** 2
    model.net.train()
    for f, h in zip(model.fisher, by_hand):
        torch.testing.assert_close(f, h / len(split), rtol=1e-4, atol=1e-10)
    first_fisher = [f.clone() for f in model.fisher]
    anchor = [p.detach().clone() for p in params]

    train_steps(model, dataset, 4, task=1)
    inputs, labels, raw, indices = batch(dataset, 1, range(32))
    loss = model.observe(inputs, labels, raw, indices, 1)
    model.opt.zero_grad(set_to_none=True)
    loss.backward()
    g = [p.grad.clone() for p in params]
    model.after_backward(1)
    moved = 0.0
    # The loss's gradient plus 2 λ F (θ − θ*), the gradient of Mammoth's penalty λ Σ F (θ − θ*)².
    for p, grad, f, a in zip(params, g, first_fisher, anchor):
        torch.testing.assert_close(p.grad, grad + 2 * 3.0 * f * (p.detach() - a))
        moved += (p.detach() - a).abs().sum().item()
    assert moved > 0
    model.opt.zero_grad(set_to_none=True)
    model.lifecycle.end_task(1)  # online: F ← γ F + F_task
    split = dataset.train_split(1)
    second = fisher_diagonal(model.net, split.images, split.labels, dataset.train_transform)
    for f, old, new in zip(model.fisher, first_fisher, second):
        torch.testing.assert_close(f, 0.5 * old + new)


# ---------------------------------------------------------------------------------------------------- SI

class TwoWeights(nn.Module):
    """Logits (w0·s, w1·s, 0, ..., 0) with s the mean pixel: a two-parameter network over the ten classes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.4, -0.3], dtype=torch.float64))

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True).double()
        return torch.cat([s * self.w, torch.zeros(len(x), 8, dtype=s.dtype)], 1)


def test_si_importance_is_the_path_integral_by_hand_on_a_two_parameter_network():
    lr, c, xi = 2.0, 0.7, 0.1
    args = parse_args(["--model", "si", "--lr", str(lr), "--si_c", str(c), "--xi", str(xi), "--seed", "0",
                       "--device", "cpu"])
    dataset = DATASETS.get("seq-digits")(args)
    model = SI(TwoWeights(), dataset, args)
    w = model.net.w
    omega_total, anchor = None, w.detach().clone()
    for task in range(2):
        path = torch.zeros(2, dtype=torch.float64)
        for step in range(6):
            inputs, labels, raw, indices = batch(dataset, task, range(step * 16, step * 16 + 16))
            s = inputs.flatten(1).mean(1).double()
            theta = w.detach().clone()
            p = F.softmax(torch.cat([s[:, None] * theta, torch.zeros(len(s), 8, dtype=s.dtype)], 1), 1)[:, :2]
            target = F.one_hot(labels, 10)[:, :2].double()
            g = ((p - target) * s[:, None]).mean(0)  # ∂ mean CE / ∂w, by hand
            penalty = 0 if omega_total is None else 2 * c * omega_total * (theta - anchor)
            model.lifecycle.step(model.lifecycle.observe(inputs, labels, raw, indices, task))
            torch.testing.assert_close(w.detach(), theta - lr * torch.clamp(g + penalty, -1, 1))
            path += g * (theta - w.detach())
        gained = path / ((w.detach() - anchor) ** 2 + xi)
        omega_total = gained if omega_total is None else omega_total + gained
        anchor = w.detach().clone()
        model.lifecycle.end_task(task)
        torch.testing.assert_close(model.importance, omega_total)
        torch.testing.assert_close(model.anchor, anchor)
        assert (model.importance > 0).all() and model.path.abs().sum() == 0


# ------------------------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("flags, sentence", [
    (["--model", "ewc_on", "--gamma", "1.5"],
     "--gamma must be in [0, 1] (declared by the model ewc_on), got 1.5; pass a value in that range"),
    (["--model", "ewc_on", "--e_lambda", "-1"],
     "--e_lambda must be in [0, inf) (declared by the model ewc_on), got -1.0"),
    (["--model", "ewc_on", "--e_lambda", "inf"],
     "--e_lambda must be in [0, inf) (declared by the model ewc_on), got inf"),
    (["--model", "si", "--xi", "0"], "--xi must be in (0, inf) (declared by the model si), got 0.0"),
    (["--model", "lwf", "--softmax_temp", "0"],
     "--softmax_temp must be in (0, inf) (declared by the model lwf), got 0.0"),
    (["--model", "agem", "--buffer_size", "3"], "agem keeps --buffer_size // n_tasks examples of each task"),
    (["--model", "gdumb", "--buffer_size", "10"], "pass --n_epochs 1 (got 10)"),
    (["--model", "gdumb", "--buffer_size", "10", "--n_epochs", "1", "--plasticity", "l2"],
     "gdumb trains outside the task loop's optimizer step"),
    (["--model", "gdumb", "--buffer_size", "10", "--n_epochs", "1", "--buffer_policy", "class_balanced"],
     "gdumb fills its memory with its own sampler"),
    (["--model", "gdumb", "--buffer_size", "10", "--n_epochs", "1", "--minlr", "1"],
     "--minlr must lie in [0, --maxlr], got 1.0 with --maxlr 0.05; pass a --minlr of at most 0.05"),
    (["--model", "gdumb", "--buffer_size", "10", "--n_epochs", "1", "--minlr=-1"],
     "--minlr must be in [0, inf) (declared by the model gdumb), got -1.0"),
    (["--model", "gdumb", "--buffer_size", "10", "--n_epochs", "1", "--fitting_epochs", "0"],
     "--fitting_epochs must be in [1, inf) (declared by the model gdumb), got 0"),
    (["--model", "er_ace"], "er_ace replays from a buffer"),
])
def test_impossible_values_are_refused_in_one_sentence(flags, sentence):
    with pytest.raises(ConfigError) as error:
        parse_args(["--lr", "0.1", "--device", "cpu", *flags])
    message = str(error.value)
    assert sentence in message and "\n" not in message and ". " not in message.rstrip(".")
