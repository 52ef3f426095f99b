"""cnn backbone: logits on 8×8, 28×28 and 32×32 images, exact parameter counts, flags refused in one sentence,
hidden units on every conv block and the dense layer, and a plasticity reset that keeps the function."""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from backbones import BACKBONES
from continual.args import parse_args
from plasticity._hidden_units import HiddenUnits
from utils.errors import ConfigError

SIZES = [pytest.param((1, 8, 8), id="digits-8x8"), pytest.param((1, 28, 28), id="mnist-28x28"),
         pytest.param((3, 32, 32), id="cifar-32x32")]


def cnn_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    BACKBONES.get("cnn").add_args(parser)
    return parser.parse_args(list(flags))


def make(shape, *flags: str, n_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return BACKBONES.get("cnn")(cnn_args(*flags), shape, n_classes)


def cnn_params(in_ch: int, size: int, channels: tuple[int, ...], hidden: int, n_classes: int) -> int:
    """3×3 convs with bias, a 2×2 max-pool after each while the map is at least 2 wide, a dense layer over
    the flattened maps, a linear head."""
    total, previous = 0, in_ch
    for c in channels:
        total += 9 * previous * c + c
        size, previous = (size // 2 if size >= 2 else size), c
    return total + previous * size * size * hidden + hidden + hidden * n_classes + n_classes


@pytest.mark.parametrize("shape", SIZES)
def test_logits_and_parameter_count_on_each_image_size(shape):
    model = make(shape, n_classes=7)
    assert model(torch.rand(5, *shape)).shape == (5, 7)
    assert model.features(torch.rand(5, *shape)).shape == (5, 128)
    expected = cnn_params(shape[0], shape[1], (32, 64), 128, 7)
    assert sum(p.numel() for p in model.parameters()) == expected
    deep = make(shape, "--cnn_channels", "8,16,16", "--cnn_hidden", "20", n_classes=3)
    assert deep(torch.rand(2, *shape)).shape == (2, 3)
    assert sum(p.numel() for p in deep.parameters()) == cnn_params(shape[0], shape[1], (8, 16, 16), 20, 3)


def test_the_dense_layer_is_a_linear_layer_on_the_flattened_maps():
    model = make((3, 32, 32))
    maps = torch.rand(4, 64, 8, 8)
    weight, bias = model.dense.weight, model.dense.bias
    torch.testing.assert_close(model.dense(maps).flatten(1), maps.flatten(1) @ weight.flatten(1).t() + bias)
    bound = 1 / (64 * 8 * 8) ** 0.5  # PyTorch's nn.Linear initialisation for fan-in C·H·W
    assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound


@pytest.mark.parametrize("flags,flag", [
    pytest.param(["--cnn_channels", "32,0"], "--cnn_channels", id="a-zero-width"),
    pytest.param(["--cnn_channels", "-4"], "--cnn_channels", id="a-negative-width"),
    pytest.param(["--cnn_channels", ""], "--cnn_channels", id="no-block"),
    pytest.param(["--cnn_channels", "a,b"], "--cnn_channels", id="not-numbers"),
])
def test_non_positive_sizes_are_refused_in_one_sentence_naming_the_flag(flags, flag):
    args = cnn_args(*flags)
    with pytest.raises(ConfigError) as error:
        BACKBONES.get("cnn").check_args(args)
    message = str(error.value)
    assert message.startswith(flag) and message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(ConfigError):
        BACKBONES.get("cnn")(args, (1, 8, 8), 10)
    BACKBONES.get("cnn").check_args(cnn_args("--cnn_channels", "4, 8", "--cnn_hidden", "1"))


@pytest.mark.parametrize("value", ["0", "-3"], ids=["no-hidden-unit", "negative-hidden"])
def test_a_hidden_layer_without_units_is_refused_by_its_declared_range(value):
    """--cnn_hidden's range is declared in BOUNDS: refused by main.py's parse and by the constructor alike."""
    sentence = f"--cnn_hidden must be in [1, inf) (declared by the backbone cnn), got {value}; pass a value in that range"
    with pytest.raises(ConfigError, match=re.escape(sentence)):
        parse_args(["--model", "sgd", "--lr", "0.1", "--device", "cpu", "--backbone", "cnn", "--cnn_hidden", value])
    with pytest.raises(ConfigError, match=re.escape(sentence)):
        BACKBONES.get("cnn")(cnn_args("--cnn_hidden", value), (1, 8, 8), 10)


@pytest.mark.parametrize("shape", SIZES)
def test_hidden_units_cover_every_conv_block_and_the_dense_layer(shape):
    model = make(shape, "--cnn_channels", "4,6,8", "--cnn_hidden", "12")
    groups = model.hidden_units()
    assert [(g.name, g.n_units) for g in groups] == [("convs.0", 4), ("convs.1", 6), ("convs.2", 8), ("dense", 12)]
    layers = [*model.convs, model.dense]
    assert [g.incoming[0][0] for g in groups] == [layer.weight for layer in layers]
    # Every parameter but the head's is some unit's incoming weight or bias.
    incoming = {id(p) for g in groups for p, _ in g.incoming}
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.parameters()} == incoming | head and not incoming & head
    assert [g.outgoing[0][0] for g in groups] == [*(layer.weight for layer in layers[1:]), model.head.weight]
    assert all(g.activation_axis == 1 for g in groups)


def silence(model, group, mask) -> None:
    """Make the masked units dormant: zero incoming weights, bias −1 (the ReLU never fires)."""
    with torch.no_grad():
        group.incoming[0][0][mask] = 0.0
        group.incoming[1][0][mask] = -1.0


@pytest.mark.parametrize("shape", SIZES)
def test_a_plasticity_reset_of_dormant_units_keeps_the_function(shape):
    model = make(shape, "--cnn_channels", "8,16", "--cnn_hidden", "32")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(16, *shape)
    for _ in range(3):  # optimizer state everywhere
        optimizer.zero_grad()
        model(x).logsumexp(1).mean().backward()
        optimizer.step()
    units = HiddenUnits(model, optimizer)
    for index, group in enumerate(units.groups):
        mask = torch.zeros(group.n_units, dtype=torch.bool)
        mask[[1, 3]] = True
        silence(model, group, mask)
        with torch.no_grad():
            before = model(x)
        units.reset(index, mask)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
        weight = group.incoming[0][0]
        assert (weight[mask] != 0).all(), f"{group.name}: incoming weights not re-drawn"
        assert (group.incoming[1][0][mask] == 0).all()
        for param, axis in group.outgoing:
            assert (param.index_select(axis, mask.nonzero().flatten()) == 0).all()
    assert units.take_resets() == {"convs.0": 2, "convs.1": 2, "dense": 2}
