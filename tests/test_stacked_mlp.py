"""The stacked MLP's written-out backward pass and fused optimizer against autograd and torch's default SGD/Adam,
model by model, on small random data."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from backbones.mlp import MLP
from memorization.stacked_mlp import StackedMLP
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


@pytest.mark.parametrize("hidden,changes", [("8", {}), ("8,6", {"label_smoothing": 0.2}),
                                            ("6,5,4", {"optim_nesterov": True, "optim_wd": 0.0}),
                                            ("8", {"optimizer": "adam", "lr": 0.01}),
                                            ("", {"label_smoothing": 0.1})])
def test_each_model_follows_its_own_autograd_training(hidden, changes):
    settings = training(**changes)
    alone = nets(hidden)
    stacked = StackedMLP(nets(hidden), settings)
    optimizers = [build_optimizer(net.parameters(), settings) for net in alone]
    for x, y in batches(4):
        losses = []
        for k, (net, optimizer) in enumerate(zip(alone, optimizers)):
            loss = F.cross_entropy(net(x[k]), y[k], label_smoothing=settings.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            expected_correct = net(x[k]).argmax(1) == y[k]  # before the step, as the stacked forward
            gradients = [p.grad.clone() for p in net.parameters()]
            optimizer.step()
            if k == 0:
                step_gradients = gradients
                first_correct = expected_correct
        loss, correct = stacked.train_step(x, y)
        assert loss.item() == pytest.approx(sum(losses).item(), rel=1e-5)
        assert torch.equal(correct[0], first_correct)
        layers = [*alone[0].layers, alone[0].head]
        # The gradients the step used for model 0 (weight, bias per layer, nn.Linear's layout).
        for i, layer in enumerate(layers):
            torch.testing.assert_close(stacked.weights[i].grad[0], step_gradients[2 * i], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(stacked.biases[i].grad[0, :, 0], step_gradients[2 * i + 1],
                                       atol=1e-6, rtol=1e-5)
    for k, net in enumerate(alone):
        for i, layer in enumerate([*net.layers, net.head]):
            torch.testing.assert_close(stacked.weights[i][k], layer.weight.detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(stacked.biases[i][k, :, 0], layer.bias.detach(), atol=1e-6, rtol=1e-5)
        x = torch.randn(6, *SHAPE)
        with torch.no_grad():
            expected = net(x)
        torch.testing.assert_close(stacked(x, shared_input=True)[k], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stacked(x.expand(K, *x.shape))[k], expected, atol=1e-5, rtol=1e-5)


def test_a_step_uses_the_fused_optimizer_and_keeps_the_models_apart():
    stacked = StackedMLP(nets("8"), training())
    assert stacked.optimizer.defaults["fused"]
    before = [w.clone() for w in stacked.weights]
    x, y = batches(1)[0]
    x[1] = 0  # model 1's inputs are all zero: its first layer's weights get no gradient but weight decay
    stacked.train_step(x, y)
    assert torch.equal(stacked.weights[0].grad[1], torch.zeros_like(stacked.weights[0].grad[1]))
    assert not torch.equal(stacked.weights[0][0], before[0][0])
    torch.testing.assert_close(stacked.weights[0][1], before[0][1] * (1 - 0.1 * 5e-4))
