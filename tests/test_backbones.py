"""Backbones: output shapes, exact parameter counts, hidden-unit groups fit for function-preserving resets
(the per-backbone checks run over every registered backbone)."""
from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest
import torch

from backbones import BACKBONES, Backbone, UnitGroup
from plasticity._hidden_units import HiddenUnits
from utils.errors import ConfigError

# Smaller sizes for some backbones, so the reset checks run fast on CPU; every other registered backbone
# is checked with its flags' defaults on CIFAR-sized images.
FAST = {
    "mlp": ((1, 8, 8), {}),
    "resnet18": ((3, 16, 16), {"resnet_width": 8}),
    "reduced_resnet18": ((3, 16, 16), {}),
    "airbench": ((3, 32, 32), {"airbench_width": 0.25}),
}
# (name, input shape, flags) for every registered backbone, with its name as the test id.
SMALL = [pytest.param(cls.NAME, *FAST.get(cls.NAME, ((3, 32, 32), {})), id=cls.NAME) for cls in BACKBONES.classes()]
UNITS = torch.tensor([0, 2])  # reset units; below n_classes so a wrong axis 0 on the head still indexes


def make(name: str, input_shape: tuple[int, int, int], n_classes: int = 10, **flags) -> Backbone:
    """Build a backbone from its declared flags' defaults, overridden by `flags`."""
    cls = BACKBONES.get(name)
    parser = argparse.ArgumentParser()
    cls.add_args(parser)
    args = parser.parse_args([])
    vars(args).update(flags)
    torch.manual_seed(0)
    return cls(args, input_shape, n_classes)


def resnet18_params(nf: int, in_ch: int, n_classes: int) -> int:
    """Parameter count of the CIFAR ResNet-18 (bias-free convs, BN scale+shift, 1×1 conv shortcuts)."""
    total = 9 * in_ch * nf + 2 * nf
    in_planes = nf
    for planes in (nf, nf, 2 * nf, 2 * nf, 4 * nf, 4 * nf, 8 * nf, 8 * nf):
        total += 9 * in_planes * planes + 9 * planes * planes + 4 * planes
        if in_planes != planes:
            total += in_planes * planes + 2 * planes
        in_planes = planes
    return total + 8 * nf * n_classes + n_classes


def vit_params(depth: int, d: int, mlp_ratio: float, patch: int, in_ch: int, img: int, n_classes: int) -> int:
    """Parameter count of a timm ViT with class token, learned positions, qkv bias and final LayerNorm."""
    m = int(d * mlp_ratio)
    tokens = (img // patch) ** 2 + 1
    embed = in_ch * patch * patch * d + d + d + tokens * d  # patch conv, class token, positions
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # LNs qkv proj fc1 fc2
    return embed + depth * block + 2 * d + d * n_classes + n_classes


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,shape,flags", [
    ("mlp", (1, 8, 8), {}),
    ("resnet18", (3, 32, 32), {"resnet_width": 8}),
    ("resnet18", (3, 64, 64), {"resnet_width": 8}),
    ("resnet18", (1, 28, 28), {"resnet_width": 8}),
    ("reduced_resnet18", (3, 32, 32), {}),
    ("reduced_resnet18", (3, 64, 64), {}),
    ("vit", (3, 32, 32), {}),
    ("vit", (3, 64, 64), {"vit_act": "gelu"}),
])
def test_output_shape(name, shape, flags):
    model = make(name, shape, n_classes=7, **flags)
    assert model(torch.rand(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)], ids=["digits", "mnist", "cifar"])
@pytest.mark.parametrize("name,small_shape,flags", SMALL)
def test_every_backbone_gives_logits_or_refuses_the_image_size_in_one_sentence(name, small_shape, flags, shape):
    try:
        model = make(name, shape, n_classes=7, **flags)
    except ConfigError as error:  # e.g. airbench, built for 32×32 only
        assert "\n" not in str(error) and str(error).endswith(".")
        return
    assert model(torch.rand(3, *shape)).shape == (3, 7)


def test_parameter_counts():
    assert n_params(make("mlp", (1, 8, 8))) == 17_610
    assert resnet18_params(64, 3, 10) == 11_173_962
    assert n_params(make("resnet18", (3, 32, 32))) == 11_173_962
    assert n_params(make("resnet18", (3, 32, 32), resnet_width=16)) == resnet18_params(16, 3, 10)
    assert n_params(make("reduced_resnet18", (3, 32, 32))) == resnet18_params(20, 3, 10) == 1_094_750
    assert n_params(make("vit", (3, 32, 32))) == vit_params(3, 48, 4.0, 4, 3, 32, 10) == 90_922
    vit = make("vit", (3, 64, 64), n_classes=2, vit_depth=2, vit_width=32, vit_heads=4, vit_patch=8)
    assert n_params(vit) == vit_params(2, 32, 4.0, 8, 3, 64, 2)


@pytest.mark.parametrize("name,shape,flags", SMALL)
def test_activation_hooks_see_the_units(name, shape, flags):
    model = make(name, shape, **flags)
    seen = {}
    for group in model.hidden_units():
        def hook(module, inputs, out, g=group):
            seen.setdefault(g.name, []).append(out.shape[g.activation_axis])
        group.activation.register_forward_hook(hook)
    model(torch.rand(4, *shape))
    assert seen == {g.name: [g.n_units] for g in model.hidden_units()}  # each fires once, with n_units


@pytest.mark.parametrize("name,shape,flags", SMALL)
def test_groups_are_real_parameters_and_never_the_head(name, shape, flags):
    model = make(name, shape, **flags)
    params = {id(p) for p in model.parameters()}
    head = {id(p) for p in model.head.parameters()}
    groups = model.hidden_units()
    assert groups and len({g.name for g in groups}) == len(groups)
    for g in groups:
        for p, axis in g.incoming + g.outgoing:
            assert id(p) in params and p.shape[axis] == g.n_units
        assert not head & {id(p) for p, _ in g.incoming}


def reset(model: Backbone, group: UnitGroup, incoming: bool, outgoing: bool) -> None:
    """Reset UNITS as a plasticity method would: new weights, zero biases, norm scales 1; zero outgoing."""
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for p, axis in group.incoming if incoming else []:
            new = torch.randn_like(p.index_select(axis, UNITS)) * p.std()
            if p.dim() == 1:
                new = torch.zeros_like(new) if names[id(p)].endswith("bias") else torch.ones_like(new)
            p.index_copy_(axis, UNITS, new)
        for p, axis in group.outgoing if outgoing else []:
            p.index_fill_(axis, UNITS, 0.0)


def calibrated(model: Backbone, shape: tuple[int, int, int]) -> Backbone:
    """Set BN running statistics from a batch (a fresh net's eval-mode BN gives outputs too tiny to test)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(torch.rand(32, *shape))
    return model


def outputs_after_reset(model, x, group_index, train, incoming, outgoing, edit=lambda g: g):
    """Output of a copy of `model` whose group `group_index` (after `edit`) was reset."""
    model = copy.deepcopy(model).train(train)
    reset(model, edit(model.hidden_units()[group_index]), incoming, outgoing)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,shape,flags", SMALL)
def test_reset_preserves_function(name, shape, flags, train):
    model = calibrated(make(name, shape, **flags), shape)
    x = torch.rand(8, *shape)
    with torch.no_grad():
        original = copy.deepcopy(model).train(train)(x)
    for i in range(len(model.hidden_units())):
        torch.manual_seed(i)
        silenced = outputs_after_reset(model, x, i, train, incoming=False, outgoing=True)
        full = outputs_after_reset(model, x, i, train, incoming=True, outgoing=True)
        torch.testing.assert_close(full, silenced, rtol=0, atol=1e-6)
        # The check has teeth: new incoming weights do change the output while the outgoing ones live.
        redrawn = outputs_after_reset(model, x, i, train, incoming=True, outgoing=False)
        assert (redrawn - original).abs().max() > 1e-4


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,shape,flags", SMALL)
def test_the_plasticity_reset_removes_exactly_the_reset_units(name, shape, flags, train):
    """HiddenUnits.reset (incoming weights re-drawn from the backbone's initialisation, outgoing zeroed, BN
    statistics of the channels restarted) gives the function of the network with only those units'
    outgoing weights zeroed."""
    model = calibrated(make(name, shape, **flags), shape)
    x = torch.rand(8, *shape)
    mask = torch.zeros(max(g.n_units for g in model.hidden_units()), dtype=torch.bool).index_fill_(0, UNITS, True)
    for i, group in enumerate(model.hidden_units()):
        silenced = outputs_after_reset(model, x, i, train, incoming=False, outgoing=True)
        net = copy.deepcopy(model).train(train)
        units = HiddenUnits(net, torch.optim.SGD(net.parameters(), lr=0.1))
        weight, axis = units.groups[i].incoming[0]
        before = weight.detach().clone()
        units.reset(i, mask[:group.n_units])
        with torch.no_grad():
            torch.testing.assert_close(net(x), silenced, rtol=0, atol=1e-5)
        changed = (weight.detach() != before).transpose(0, axis).flatten(1).any(1)
        assert torch.equal(changed, mask[:group.n_units]), f"{group.name}: not exactly the reset units re-drawn"


@pytest.mark.parametrize("name,shape,flags", SMALL)
def test_reset_check_catches_a_wrong_outgoing_axis(name, shape, flags):
    model = calibrated(make(name, shape, **flags), shape)
    x = torch.rand(8, *shape)
    wrong_axis = lambda g: dataclasses.replace(g, outgoing=[(p, 0) for p, _ in g.outgoing])  # noqa: E731
    for i in range(len(model.hidden_units())):
        torch.manual_seed(i)
        silenced = outputs_after_reset(model, x, i, False, incoming=False, outgoing=True, edit=wrong_axis)
        full = outputs_after_reset(model, x, i, False, incoming=True, outgoing=True, edit=wrong_axis)
        assert (full - silenced).abs().max() > 1e-4


@pytest.mark.parametrize("act,module", [("relu", torch.nn.ReLU), ("gelu", torch.nn.GELU)])
def test_vit_activation_flag(act, module):
    groups = make("vit", (3, 32, 32), vit_act=act).hidden_units()
    assert len(groups) == 3 and all(type(g.activation) is module for g in groups)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as error:
        BACKBONES.get("nope")
    for name in ("mlp", "resnet18", "reduced_resnet18", "vit"):
        assert name in str(error.value)


@pytest.mark.parametrize("flags", [{"vit_patch": 5}, {"vit_width": 50}])
def test_vit_refuses_impossible_sizes(flags):
    with pytest.raises(ConfigError):
        make("vit", (3, 32, 32), **flags)
