"""parseval: the gradient it adds is the penalty's, and training with it keeps the hidden layers' rows near
s-scaled orthonormal."""
from __future__ import annotations

import argparse

import pytest
import torch

from backbones import BACKBONES
from plasticity import PLASTICITY
from plasticity.parseval import hidden_weight_matrices, parseval_penalty


def backbone(name: str, shape=(1, 8, 8)):
    parser = argparse.ArgumentParser()
    BACKBONES.get(name).add_args(parser)
    return BACKBONES.get(name)(parser.parse_args([]), shape, 10)


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (3, 32, 32))])
def test_the_added_gradient_is_the_penalty_gradient_on_hidden_layers_only(name, shape):
    torch.manual_seed(0)
    net = backbone(name, shape)
    weights = hidden_weight_matrices(net)
    head = [p for p in net.parameters() if p.dim() >= 2 and all(p is not w for w in weights)]
    assert weights and head  # the head (and nothing else of two dimensions) is left alone
    args = argparse.Namespace(parseval_lambda=1e-3, parseval_scale=2.0)
    method = PLASTICITY.get("parseval")(net, None, None, args)
    for p in net.parameters():
        p.grad = None
    method.after_backward(0)
    expected = torch.autograd.grad(1e-3 * parseval_penalty(weights, 2.0), weights)
    for w, g in zip(weights, expected):
        torch.testing.assert_close(w.grad, g, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in head)


def test_training_with_it_moves_the_rows_towards_scaled_orthonormal():
    x, y = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 10
    penalties = {}
    for strength in (0.0, 1.0):
        torch.manual_seed(0)  # the same network both times
        net = backbone("mlp")
        weights = hidden_weight_matrices(net)
        method = PLASTICITY.get("parseval")(net, None, None, argparse.Namespace(parseval_lambda=strength,
                                                                                parseval_scale=2.0))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        before = parseval_penalty(weights, 2.0).item()
        for _ in range(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            method.after_backward(0)
            optimizer.step()
        penalties[strength] = parseval_penalty(weights, 2.0).item()
    assert penalties[1.0] < 0.5 * before and penalties[0.0] > 0.9 * before
