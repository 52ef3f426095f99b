"""airbench backbone: shapes, exact parameter count, refused sizes, function-preserving resets, vmapped copies."""
from __future__ import annotations

import argparse
import copy
import math
import re

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from backbones import BACKBONES
from continual.args import parse_args
from plasticity._hidden_units import HiddenUnits
from utils.errors import ConfigError

SHAPE = (3, 32, 32)


def make(width: float = 0.25, shape: tuple[int, int, int] = SHAPE, n_classes: int = 10, seed: int = 0):
    cls = BACKBONES.get("airbench")
    parser = argparse.ArgumentParser()
    cls.add_args(parser)
    args = parser.parse_args(["--airbench_width", str(width)])
    torch.manual_seed(seed)
    return cls(args, shape, n_classes)


def airbench_params(widths: tuple[int, int, int], in_ch: int, n_classes: int) -> int:
    """2×2 stem with bias to 24 channels; per group two bias-free 3×3 convs and two BN shifts (scales
    are fixed, not parameters); a bias-free head."""
    total = 4 * in_ch * 24 + 24
    for a, b in zip((24,) + widths[:-1], widths):
        total += 9 * a * b + b + 9 * b * b + b
    return total + widths[-1] * n_classes


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrated(model):
    """BN running statistics from one batch (cumulative average: exactly that batch's statistics)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(32, *SHAPE))
    return model


def test_output_shape_and_parameter_count():
    model = make(1.0)
    assert model(torch.rand(2, *SHAPE)).shape == (2, 10)
    # stem 312; groups 50,816 + 737,792 + 1,180,160; head 2,560
    assert n_params(model) == airbench_params((64, 256, 256), 3, 10) == 1_971_640
    assert n_params(make(0.25)) == airbench_params((16, 64, 64), 3, 10)
    gray = make(0.5, shape=(1, 32, 32), n_classes=7)
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert n_params(gray) == airbench_params((32, 128, 128), 1, 7)


def test_paper_details():
    model = make()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(bn.momentum == 0.4 and bn.eps == 1e-12 for bn in bns)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("bn1.weight") or n.endswith("bn2.weight") for n in names)  # fixed scales
    assert all(torch.equal(bn.weight, torch.ones_like(bn.bias)) for bn in bns)
    assert model.head.bias is None and model.stem.bias is not None
    x = torch.rand(2, *SHAPE)
    model.eval()
    torch.testing.assert_close(model(x), model.head(model.pool(_trunk(model, x)).flatten(1)) / 9)


def _trunk(model, x):
    x = model.stem_act(model.stem(x))
    for group in model.groups:
        x = group(x)
    assert x.shape[-2:] == (3, 3)  # 32 → 31 (stem) → 15 → 7 → 3 (pools) → 1 (max-pool 3)
    return x


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 64, 64), (3, 32, 31)])
def test_other_image_sizes_are_refused_with_one_sentence(shape):
    with pytest.raises(ConfigError) as error:
        make(shape=shape)
    message = str(error.value)
    assert "32×32" in message and f"{shape[1]}×{shape[2]}" in message
    assert message.endswith(".") and message.count(". ") == 0


@pytest.mark.parametrize("width,ok", [(0.0, False), (-1.0, False), (0.01, True), (2.0, True)])
def test_a_non_positive_width_is_refused(width, ok):
    argv = ["--model", "sgd", "--lr", "0.1", "--device", "cpu", "--backbone", "airbench", "--airbench_width", str(width)]
    if ok:
        assert parse_args(argv).airbench_width == width
    else:
        sentence = (f"--airbench_width must be in (0, inf) (declared by the backbone airbench), got {width}; "
                    f"pass a value in that range")
        with pytest.raises(ConfigError, match=re.escape(sentence)):
            parse_args(argv)


def test_hidden_units_are_the_groups_inner_channels_and_hooks_see_them():
    model = make()
    groups = model.hidden_units()
    assert [(g.name, g.n_units) for g in groups] == [("groups.0", 16), ("groups.1", 64), ("groups.2", 64)]
    params = {id(p) for p in model.parameters()}
    seen = {}
    for g in groups:
        assert all(id(p) in params and p.shape[axis] == g.n_units for p, axis in g.incoming + g.outgoing)
        assert id(model.head.weight) not in {id(p) for p, _ in g.incoming}
        g.activation.register_forward_hook(lambda m, i, out, g=g: seen.setdefault(g.name, []).append(out.shape[1]))
    model(torch.rand(4, *SHAPE))
    assert seen == {g.name: [g.n_units] for g in groups}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reset_keeps_the_function_and_redraws_the_incoming_weights(train):
    model = calibrated(make())
    x = torch.rand(8, *SHAPE)
    with torch.no_grad():
        original = copy.deepcopy(model).train(train)(x)
    for index in range(3):
        torch.manual_seed(index)
        mask = torch.zeros(model.hidden_units()[index].n_units, dtype=torch.bool)
        mask[torch.randperm(mask.numel())[:2]] = True

        silenced = copy.deepcopy(model).train(train)  # the units' outgoing weights zeroed, nothing else
        with torch.no_grad():
            silenced.groups[index].conv2.weight[:, mask] = 0
            expected = silenced(x)

        net = copy.deepcopy(model).train(train)
        units = HiddenUnits(net, torch.optim.SGD(net.parameters(), lr=0.1))
        group = net.groups[index]
        before = group.conv1.weight.detach().clone()
        units.reset(index, mask)
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
        after = group.conv1.weight.detach()
        assert (after[mask] - before[mask]).abs().amin(dim=(1, 2, 3)).gt(0).all()  # every reset filter changed
        assert torch.equal(after[~mask], before[~mask])
        assert (group.bn1.bias[mask] == 0).all() and (group.conv2.weight[:, mask] == 0).all()

        # The check has teeth: the new incoming weights change the output while the outgoing ones live.
        with torch.no_grad():
            group.conv2.weight.copy_(model.groups[index].conv2.weight)
            assert (net(x) - original).abs().max() > 1e-4


def test_reset_draws_from_pytorchs_initialisation():
    net = make()
    units = HiddenUnits(net, torch.optim.SGD(net.parameters(), lr=0.1))
    weight = net.groups[1].conv1.weight
    with torch.no_grad():
        weight.mul_(50)
    units.reset(1, torch.ones(64, dtype=torch.bool))
    fan_in = weight[0].numel()
    assert weight.abs().max() <= 1 / math.sqrt(fan_in) and weight.std() > 0.4 / math.sqrt(fan_in)


def test_vmapped_copies_match_the_networks_run_one_by_one():
    nets = [make(seed=k).train() for k in range(3)]
    params, buffers = stack_module_state(nets)  # copies: the nets' own buffers stay apart
    base = copy.deepcopy(nets[0]).to("meta")
    x = torch.randn(3, 8, *SHAPE)
    with torch.no_grad():
        stacked = vmap(lambda p, b, xs: functional_call(base, (p, b), (xs,)), in_dims=(0, 0, 0))(params, buffers, x)
        one_by_one = torch.stack([net(x[k]) for k, net in enumerate(nets)])
    torch.testing.assert_close(stacked, one_by_one, rtol=0, atol=1e-5)
    means = [name for name in buffers if name.endswith("running_mean")]
    assert len(means) == 6
    for name in means:
        ref = torch.stack([net.get_buffer(name) for net in nets])
        assert ref.abs().max() > 1e-3  # the statistics did move away from 0
        torch.testing.assert_close(buffers[name], ref, rtol=0, atol=1e-6)
