"""Re-initialisation, over every registered backbone: each fresh draw re-draws every parameterised module,
head included (the backbone's own or one a model swaps in), restores the deterministic values (norm scales
1, biases 0, running statistics), and Shrink & Perturb's fresh-initialisation noise changes at every step."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from backbones import BACKBONES, Backbone
from models.er_ace import CosineHead
from plasticity._hidden_units import Reinitializer
from plasticity.shrink_perturb import ShrinkPerturb

SHAPE = (3, 32, 32)  # CIFAR-sized: an input every backbone takes
N_CLASSES = 10


def variants() -> list:
    """Every registered backbone with its flags' defaults, and once more for each other value of each of its
    flags that has a fixed set of choices (mlp's --mlp_init xavier, vit's --vit_act gelu, ...)."""
    found = []
    for cls in BACKBONES.classes():
        parser = argparse.ArgumentParser()
        cls.add_args(parser)
        defaults = parser.parse_args([])
        cls.check_args(defaults)  # which may fill in a default (mlp's --mlp_init)
        found.append(pytest.param(cls, {}, id=cls.NAME))
        for action in parser._actions:
            for choice in action.choices or ():
                if choice != getattr(defaults, action.dest):
                    found.append(pytest.param(cls, {action.dest: choice}, id=f"{cls.NAME}-{action.dest}={choice}"))
    return found


VARIANTS = variants()
HEADS = ["own_head", "cosine_head"]  # the backbone's head, or er_ace's cosine classifier swapped in for it


def make(cls: type[Backbone], flags: dict, head: str = "own_head") -> Backbone:
    """Build a backbone from its declared flags' defaults, overridden by `flags`, as a run would."""
    parser = argparse.ArgumentParser()
    cls.add_args(parser)
    args = parser.parse_args([])
    vars(args).update(flags)
    cls.check_args(args)
    torch.manual_seed(0)
    net = cls(args, SHAPE, N_CLASSES)
    if head == "cosine_head":  # as er_ace does with --use_custom_classifier 1
        weight = net.head.weight
        net.head = CosineHead(weight.shape[1], weight.shape[0])
    return net


def is_constant(tensor: torch.Tensor) -> bool:
    """A deterministic initial value (norm scales 1, biases 0): every entry the same."""
    return tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all())


def trained(net: nn.Module) -> dict[str, torch.Tensor]:
    """Move every parameter and floating buffer away from its initial value (as training would); returns
    the initial values."""
    initial = {name: t.detach().clone() for name, t in [*net.named_parameters(), *net.named_buffers()]}
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.add_(torch.rand_like(t) + 1)
    return initial


def assert_redrawn(name: str, first: torch.Tensor, second: torch.Tensor, initial: torch.Tensor) -> None:
    """A randomly initialised tensor differs between two draws almost everywhere; a deterministic one is
    restored to its initial value by both."""
    if is_constant(initial):
        assert torch.equal(first, initial) and torch.equal(second, initial), f"{name} not restored to its init"
    else:
        same = (first == second).float().mean().item()
        assert same < 0.01, f"{name}: {same:.0%} of its entries are the same in two fresh draws"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("cls,flags", VARIANTS)
def test_two_fresh_draws_differ_in_every_random_tensor_and_restore_the_deterministic_ones(cls, flags, head):
    net = make(cls, flags, head)
    initial = trained(net)
    reinitializer = Reinitializer(net)
    first = {name: t.clone() for name, t in reinitializer.fresh_network().items()}
    second = reinitializer.fresh_network()
    assert first.keys() == dict(net.named_parameters()).keys()
    for name in first:
        assert_redrawn(name, first[name], second[name], initial[name])
    assert not is_constant(initial["head.weight"])  # so the head's check above was a re-draw check
    for name, buffer in reinitializer.scratch.named_buffers():  # BatchNorm running statistics restart
        if buffer.is_floating_point():
            assert torch.equal(buffer, initial[name]), f"{name} not restored to its initial value"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("cls,flags", VARIANTS)
def test_reinitialize_redraws_the_whole_network_in_place(cls, flags, head):
    net = make(cls, flags, head)
    initial = trained(net)
    net.reinitialize_()
    first = {name: p.detach().clone() for name, p in net.named_parameters()}
    net.reinitialize_()
    for name, param in net.named_parameters():
        assert_redrawn(name, first[name], param.detach(), initial[name])


@pytest.mark.parametrize("cls,flags", VARIANTS)
def test_partial_fresh_draws_cover_the_head(cls, flags):
    net = make(cls, flags)
    trained(net)
    reinitializer = Reinitializer(net)
    params = list(net.head.parameters())
    first = [t.clone() for t in reinitializer.fresh(params)]
    second = reinitializer.fresh(params)
    assert (first[0] == second[0]).float().mean() < 0.01


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("cls,flags", VARIANTS)
def test_shrink_perturb_init_noise_is_a_new_draw_at_every_step(cls, flags, head):
    net = make(cls, flags, head)
    initial = trained(net)
    parser = argparse.ArgumentParser()
    ShrinkPerturb.add_args(parser)
    # p ≈ 0, σ = 1: after a step each parameter is (up to 1e-9 of its old value) that step's noise.
    args = parser.parse_args(["--sp_shrink", "1e-9", "--sp_sigma", "1", "--sp_noise", "init"])
    ShrinkPerturb.check_args(args)
    method = ShrinkPerturb(net, torch.optim.SGD(net.parameters(), lr=0.1), None, args)
    noise = []
    for step in range(2):
        method.after_step(step)
        noise.append({name: p.detach().clone() for name, p in net.named_parameters()})
    head = [name for name in noise[0] if name.startswith("head.")]
    assert head and not is_constant(initial["head.weight"])
    for name in noise[0]:
        if is_constant(initial[name]):
            torch.testing.assert_close(noise[0][name], initial[name])
            torch.testing.assert_close(noise[1][name], initial[name])
        else:
            # A constant noise would leave ε·(1 + 1e-9), which rounds to ε: the same value exactly.
            same = (noise[0][name] == noise[1][name]).float().mean().item()
            assert same < 0.01, f"{name}: the noise of two steps agrees on {same:.0%} of its entries"


# -- a module the re-initialisation cannot draw is refused, never skipped --------------------------------
class PlainHead(nn.Module):
    """A head with a parameter and no reset_parameters."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x):
        return x @ self.weight.t()


class HalfResetHead(PlainHead):
    """A head whose reset_parameters forgets one of its parameters."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.scale = nn.Parameter(torch.ones(()))

    def reset_parameters(self):
        nn.init.normal_(self.weight)


@pytest.mark.parametrize("head,message", [
    pytest.param(PlainHead, "has parameters but no reset_parameters", id="no_reset_parameters"),
    pytest.param(HalfResetHead, "left scale of head", id="a_parameter_left_out"),
])
@pytest.mark.parametrize("cls,flags", [v for v in VARIANTS if not v.values[1]])  # defaults only
def test_a_module_that_cannot_be_redrawn_is_refused_by_name(cls, flags, head, message):
    net = make(cls, flags)
    net.head = head(net.head.weight)
    with pytest.raises(RuntimeError, match=message):
        net.reinitialize_()
    with pytest.raises(RuntimeError, match=message):
        Reinitializer(net).fresh_network()


def test_a_backbone_that_overrides_reinitialize_is_refused():
    with pytest.raises(TypeError, match="init_module_"):
        class Skipping(Backbone):  # noqa: F841 (defining it is the test)
            def reinitialize_(self, modules=None):
                pass
