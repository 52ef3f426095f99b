"""The stacked MLP's written-out backward pass and fused optimizer against autograd and torch's default SGD/Adam,
model by model, on small random data."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from backbones.mlp import MLP
from memorization.stacked_mlp import StackedMLP
from memorization.training import Ensemble
from utils.optimizers import build_optimizer

SHAPE, N_CLASSES, K, BATCH = (1, 4, 3), 5, 3, 7


def training(**changes) -> argparse.Namespace:
    values = {"optimizer": "sgd", "lr": 0.1, "optim_mom": 0.9, "optim_wd": 5e-4, "optim_nesterov": False,
              "optim_eps": 1e-8, "label_smoothing": 0.0}
    return argparse.Namespace(**{**values, **changes})


def nets(hidden: str) -> list[MLP]:
    torch.manual_seed(0)
    return [MLP(argparse.Namespace(mlp_hidden=hidden, mlp_init="torch"), SHAPE, N_CLASSES) for _ in range(K)]


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(K, BATCH, *SHAPE, generator=generator),
             torch.randint(0, N_CLASSES, (K, BATCH), generator=generator)) for _ in range(steps)]


@pytest.mark.parametrize("hidden,changes", [("8", {}), ("8,6", {"label_smoothing": 0.2}), ("7,7", {}),
                                            ("6,5,4", {"optim_nesterov": True, "optim_wd": 0.0}),
                                            ("8", {"optimizer": "adam", "lr": 0.01}),
                                            ("8", {"optim_mom": 0.0}), ("", {"label_smoothing": 0.1})])
@pytest.mark.parametrize("cpu_kernels", [True, False])  # False: torch's operators, the path of other devices
def test_each_model_follows_its_own_autograd_training(hidden, changes, cpu_kernels):
    """Step by step, every model's weights and loss as autograd and torch's default optimizer give them, on the
    path that writes SGD out (plain SGD) and on the one that hands the gradients to torch (Nesterov, Adam)."""
    settings = training(**changes)
    alone = nets(hidden)
    stacked = StackedMLP(nets(hidden), settings)
    assert stacked.cpu_kernels
    stacked.cpu_kernels = cpu_kernels
    assert stacked.sgd_in_products == (settings.optimizer == "sgd" and not settings.optim_nesterov)
    optimizers = [build_optimizer(net.parameters(), settings) for net in alone]
    for x, y in batches(4):
        losses, all_logits = [], []
        for k, (net, optimizer) in enumerate(zip(alone, optimizers)):
            logits = net(x[k])
            loss = F.cross_entropy(logits, y[k], label_smoothing=settings.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            all_logits.append(logits.detach())  # before the step, as the stacked forward
        loss, logits = stacked.train_step(x, y)
        assert loss.item() == pytest.approx(sum(losses).item(), rel=1e-5)
        torch.testing.assert_close(logits, torch.stack(all_logits), atol=1e-5, rtol=1e-5)
        for k, net in enumerate(alone):
            for i, layer in enumerate([*net.layers, net.head]):
                torch.testing.assert_close(stacked.weights[i][k], layer.weight.detach(), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(stacked.biases[i][k, :, 0], layer.bias.detach(), atol=1e-6, rtol=1e-5)
    for k, net in enumerate(alone):
        x = torch.randn(6, *SHAPE)
        with torch.no_grad():
            expected = net(x)
        torch.testing.assert_close(stacked(x, shared_input=True)[k], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stacked(x.expand(K, *x.shape))[k], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [{}, {"optim_nesterov": True}])
def test_a_model_whose_inputs_are_zero_only_decays_and_the_others_move(changes):
    stacked = StackedMLP(nets("8"), training(**changes))
    before = [w.clone() for w in stacked.weights]
    x, y = batches(1)[0]
    x[1] = 0  # model 1's inputs are all zero: its first layer's weights get no gradient but weight decay
    stacked.train_step(x, y)
    assert not torch.equal(stacked.weights[0][0], before[0][0])
    decay = 0.1 * 5e-4 * (1 + 0.9 * bool(changes))  # Nesterov's step adds momentum × the buffer once more
    torch.testing.assert_close(stacked.weights[0][1], before[0][1] * (1 - decay))


def test_the_learning_rate_schedule_reaches_the_written_out_sgd_step():
    stacked = StackedMLP(nets("8"), training(optim_mom=0.0, optim_wd=0.0))
    assert stacked.sgd_in_products
    stacked.optimizer.param_groups[0]["lr"] = 0.0  # what a schedule at a factor of 0 sets
    before = [p.clone() for p in stacked.parameters]
    stacked.train_step(*batches(1)[0])
    assert all(torch.equal(p, b) for p, b in zip(stacked.parameters, before))


@pytest.mark.parametrize("changes", [{}, {"optimizer": "adam", "lr": 0.01}])
def test_a_model_gets_the_same_bits_alone_as_in_any_place_of_its_group(changes):
    """What makes split training's files the same bytes whatever the group: odd batches (15 rows), so that a
    model's slices lie at every alignment, and each model equal bit for bit to its own training alone."""
    torch.manual_seed(0)
    shape, k, steps = (1, 8, 8), 5, 6
    nets = [MLP(argparse.Namespace(mlp_hidden="64", mlp_init="torch"), shape, 10) for _ in range(k)]
    settings = training(**changes)
    group = StackedMLP(nets, settings)
    alone = [StackedMLP([net], settings) for net in nets]
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(k, 15, *shape, generator=generator), torch.randint(0, 10, (k, 15), generator=generator)
        logits = group.train_step(x, y, with_loss=False)[1].clone()
        for m, model in enumerate(alone):
            assert torch.equal(model.train_step(x[m:m + 1], y[m:m + 1], with_loss=False)[1][0], logits[m])
    for m, model in enumerate(alone):
        for together, single in zip(group.parameters, model.parameters):
            assert torch.equal(together[m], single[0])


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_a_nan_passes_through_every_layer_to_the_loss(cpu_kernels):
    """A diverged model must show in the loss that train_group checks: a NaN in a hidden unit is not zeroed by the
    ReLU, and a NaN gradient reaches the weights."""
    stacked = StackedMLP(nets("8,8"), training())
    stacked.cpu_kernels = cpu_kernels
    x, y = batches(1)[0]
    stacked.weights[0][1, 0] = float("nan")  # model 1's first hidden unit
    loss, logits = stacked.train_step(x, y)
    assert torch.isnan(loss) and torch.isnan(logits[1]).all() and torch.isfinite(logits[[0, 2]]).all()
    assert torch.isnan(stacked.weights[1][1]).any() and torch.isfinite(stacked.weights[1][[0, 2]]).all()


def test_a_label_outside_the_classes_is_refused_by_the_cpu_kernel():
    stacked = StackedMLP(nets("8"), training())
    x, y = batches(1)[0]
    y[2, 3] = N_CLASSES
    with pytest.raises(IndexError, match="a label is outside the model's classes"):
        stacked.train_step(x, y, with_loss=False)  # the loss, when asked for, refuses it first


@pytest.mark.parametrize("way", ["stacked, CPU kernels", "stacked, torch's operators", "vmapped Ensemble"])
def test_a_steps_correctness_is_its_forward_passs_argmax_ties_included(way):
    """`correct` receives, for each model and example, whether the argmax of that step's logits is the label; with
    equal logits the first class is the prediction, as argmax's. Written into columns of a wider tensor, as
    train_group writes an epoch's."""
    group = nets("8")
    if way == "vmapped Ensemble":
        ensemble = Ensemble(group, training())
    else:
        ensemble = StackedMLP(group, training())
        ensemble.cpu_kernels = way == "stacked, CPU kernels"
    (x, y), (x_tied, _) = batches(2)
    epoch = torch.zeros(K, 3 * BATCH, dtype=torch.bool)
    _, logits = ensemble.train_step(x, y, correct=epoch[:, BATCH:2 * BATCH])
    assert torch.equal(epoch[:, BATCH:2 * BATCH], logits.argmax(-1) == y)
    assert 0 < epoch.sum() < K * BATCH and not epoch[:, :BATCH].any() and not epoch[:, 2 * BATCH:].any()
    with torch.no_grad():  # every logit equal: class 0 is every prediction
        for weight in ensemble.weights[-1:] if way != "vmapped Ensemble" else [ensemble.params["head.weight"]]:
            weight.zero_()
        for bias in ensemble.biases[-1:] if way != "vmapped Ensemble" else [ensemble.params["head.bias"]]:
            bias.fill_(0.5)
    y_tied = torch.arange(K * BATCH).view(K, BATCH) % N_CLASSES
    _, logits = ensemble.train_step(x_tied, y_tied, correct=epoch[:, :BATCH])
    assert (logits == 0.5).all()
    assert torch.equal(epoch[:, :BATCH], y_tied == 0)
