"""Hidden units at work: per-step activation statistics, neuron ages, and the one reset every method uses.

Plasticity methods see neurons, not layers: a backbone lists its hidden units as `UnitGroup`s
(MLP units, conv channels, ViT MLP units), and everything here works on any backbone through them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from backbones import Backbone, UnitGroup
from utils.errors import ConfigError


class UnitMonitor:
    """Forward hooks that sum, per unit, |h| and the count of h > 0 over the inputs × positions of
    every training-mode forward pass of one optimisation step (a replay model's several passes
    count together). `end_step` turns the sums into the step's statistics and updates neuron ages. A unit with
    several outputs (CReLU's relu(h) and relu(−h)) adds the sum of their |values| and fires where any is > 0.

    Ages: `age_steps` counts the steps since the unit last fired (it fires in a step when any input
    × position is > 0); `age_tokens` counts inputs × positions ("tokens"): a silent step adds all
    of the step's tokens, a step where the unit fires sets it to tokens / positive tokens, the
    expected gap between two firings within the step (SNR-V2's token-level age).

    On request (`keep_step_inputs`) the monitor also keeps the inputs of the step's training-mode
    forward passes through the whole network (`step_inputs`, the last finished step's), so a method can
    look at the same inputs again with the network in another mode.
    """

    def __init__(self, groups: list[UnitGroup]):
        self.groups = groups
        self._inputs: list[torch.Tensor] = []
        self.step_inputs: list[torch.Tensor] = []
        self._keeping_inputs = False
        self._net: nn.Module | None = None  # the network whose inputs are kept
        self.abs_sum = [torch.zeros(g.n_units, device=_device(g)) for g in groups]
        self.positive = [torch.zeros(g.n_units, device=_device(g)) for g in groups]
        self.positions = [0] * len(groups)
        self.age_steps = [torch.zeros(g.n_units, device=_device(g)) for g in groups]
        self.age_tokens = [torch.zeros(g.n_units, device=_device(g)) for g in groups]
        self.previous_age_steps = [a.clone() for a in self.age_steps]  # before the last step (SNR's arrivals)
        # Statistics of the last finished step, per group: mean |h|, positive count, positions.
        self.mean_abs: list[torch.Tensor] = [torch.zeros_like(a) for a in self.abs_sum]
        self.step_positive: list[torch.Tensor] = [torch.zeros_like(a) for a in self.abs_sum]
        self.step_positions: list[int] = [0] * len(groups)
        for i, group in enumerate(groups):
            group.activation.register_forward_hook(self._hook(i))

    def keep_step_inputs(self, net: nn.Module) -> None:
        """From now on keep the network inputs of each step. Off until a method asks: a model that trains
        outside the task loop's steps (gdumb at the end of a task) would pile up every batch of that
        training until the next step ended."""
        if not self._keeping_inputs:
            self._net = net
            net.register_forward_pre_hook(self._keep_input)
            self._keeping_inputs = True

    def _keep_input(self, module: nn.Module, inputs) -> None:
        if module.training and inputs and module is self._net:
            self._inputs.append(inputs[0].detach())

    def _hook(self, index: int):
        group = self.groups[index]

        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            # Evaluation and probes do not count as training steps; nor does a copy of the network (a
            # teacher, an EMA model), which deepcopy gives this hook too.
            if not module.training or module is not group.activation:
                return
            h = output.detach()
            if group.activation_copies > 1:
                magnitude, peak = unit_activity(h, group)
                self.abs_sum[index] += magnitude.sum(0)
                self.positive[index] += peak.sign().clamp_(min=0).sum(0)
                self.positions[index] += magnitude.shape[0]
                return
            axis = group.activation_axis % h.dim()
            dims = [d for d in range(h.dim()) if d != axis]
            # A ReLU's output is its own absolute value; and sign().clamp counts the positive entries
            # without a bool tensor cast to int64 (a full copy of the activation, 5× slower).
            self.abs_sum[index] += (h if isinstance(module, nn.ReLU) else h.abs()).sum(dim=dims)
            self.positive[index] += h.sign().clamp_(min=0).sum(dim=dims)
            self.positions[index] += h.numel() // group.n_units

        return hook

    def end_step(self) -> None:
        """Close the step: per-unit statistics of its forward passes, and the new ages."""
        self.step_inputs, self._inputs = self._inputs, []
        for i in range(len(self.groups)):
            positions = self.positions[i]
            if positions == 0:
                continue  # no training forward pass reached this group (cannot happen in a plain net)
            self.mean_abs[i] = self.abs_sum[i] / positions
            self.step_positive[i] = self.positive[i]
            self.step_positions[i] = positions
            fired = self.positive[i] > 0
            self.previous_age_steps[i] = self.age_steps[i]
            self.age_steps[i] = torch.where(fired, 0.0, self.age_steps[i] + 1)
            self.age_tokens[i] = torch.where(fired, positions / self.positive[i].clamp(min=1),
                                             self.age_tokens[i] + positions)
            self.abs_sum[i] = torch.zeros_like(self.abs_sum[i])
            self.positive[i] = torch.zeros_like(self.positive[i])
            self.positions[i] = 0

    def on_reset(self, index: int, mask: torch.Tensor) -> None:
        """A reset unit is newborn: both ages restart at 0."""
        self.age_steps[index] = self.age_steps[index].masked_fill(mask, 0.0)
        self.age_tokens[index] = self.age_tokens[index].masked_fill(mask, 0.0)

    def ages(self, unit: str) -> dict[str, torch.Tensor]:
        source = self.age_steps if unit == "steps" else self.age_tokens
        return {g.name: a for g, a in zip(self.groups, source)}

    def state_dict(self) -> dict:
        return {"age_steps": [a.cpu() for a in self.age_steps], "age_tokens": [a.cpu() for a in self.age_tokens]}

    def load_state_dict(self, state: dict) -> None:
        self.age_steps = [a.to(b.device) for a, b in zip(state["age_steps"], self.age_steps)]
        self.age_tokens = [a.to(b.device) for a, b in zip(state["age_tokens"], self.age_tokens)]


def _device(group: UnitGroup) -> torch.device:
    return group.incoming[0][0].device


def unit_activity(h: torch.Tensor, group: UnitGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """For an activation with several outputs per unit (UnitGroup.activation_copies): [positions, n] of each
    unit's summed |outputs| and of its largest output (> 0 where the unit fires), one row per input × position."""
    blocks = h.movedim(group.activation_axis % h.dim(), -1).reshape(-1, group.activation_copies, group.n_units)
    return blocks.abs().sum(1), blocks.amax(1)


def unit_columns(mask: torch.Tensor, param: torch.Tensor, axis: int, group: UnitGroup) -> torch.Tensor:
    """The unit mask along `axis` of an outgoing parameter, repeated over the blocks in which the parameter
    reads each unit (columns i, i + n, ... under CReLU)."""
    blocks = param.shape[axis] // group.n_units
    if blocks * group.n_units != param.shape[axis]:
        raise RuntimeError(f"{group.name}: an outgoing parameter has {param.shape[axis]} entries along axis {axis}, "
                           f"not a multiple of the group's {group.n_units} units")
    return _along(mask.repeat(blocks), param, axis)


class Reinitializer:
    """Fresh draws from the network's own initialisation, taken from a scratch copy of the network."""

    def __init__(self, net: Backbone):
        self.scratch = copy.deepcopy(net)
        self.scratch.requires_grad_(False)
        self.names = {id(p): name for name, p in net.named_parameters()}

    def fresh(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """New initial values for `params` (their modules are re-initialised in the scratch copy)."""
        names = [self.names[id(p)] for p in params]
        modules = {name.rpartition(".")[0] for name in names}
        self.scratch.reinitialize_([self.scratch.get_submodule(m) for m in sorted(modules)])
        return [self.scratch.get_parameter(name) for name in names]

    def fresh_network(self) -> dict[str, torch.Tensor]:
        """A whole new sample of the initialisation, by parameter name."""
        self.scratch.reinitialize_()
        return dict(self.scratch.named_parameters())


def _along(mask: torch.Tensor, param: torch.Tensor, axis: int) -> torch.Tensor:
    """The unit mask shaped to broadcast over `param` along `axis`."""
    shape = [1] * param.dim()
    shape[axis] = -1
    return mask.view(shape)


class HiddenUnits:
    """The network's hidden-unit groups, with the statistics hooks and the reset all methods share."""

    def __init__(self, net: Backbone, optimizer: torch.optim.Optimizer):
        self.net = net
        self.optimizer = optimizer
        self.groups = net.hidden_units()
        self.reinitializer = Reinitializer(net)  # before the hooks, so the scratch copy has none
        self.monitor = UnitMonitor(self.groups)
        self.resets = [torch.zeros((), dtype=torch.long, device=_device(g)) for g in self.groups]

    @torch.no_grad()
    def reset(self, index: int, mask: torch.Tensor) -> None:
        """Reset the units of group `index` where `mask` is True.

        Incoming weights are re-drawn from the initialisation, biases set to 0, outgoing weights set
        to 0 (so the network's function is unchanged at this moment), and the optimizer state of all
        those entries zeroed. PyTorch's Adam keeps one step count per tensor, so the step count stays
        (as in the ViT study's reference code, which zeroes Adam's moments only). A BatchNorm among the
        incoming modules restarts the running mean and variance of those channels at their initial 0
        and 1: the old statistics describe the old incoming weights, and kept they would leave a
        re-drawn channel silent in eval mode until the running averages caught up.
        """
        if not bool(mask.any()):
            return
        group = self.groups[index]
        incoming = [p for p, _ in group.incoming]
        fresh = self.reinitializer.fresh(incoming)
        for (param, axis), new in zip(group.incoming, fresh):
            where = _along(mask, param, axis)
            if self.reinitializer.names[id(param)].endswith("bias"):
                param.masked_fill_(where, 0.0)
            else:
                param.copy_(torch.where(where, new, param))
            self._zero_state(param, where)
        for param, axis in group.outgoing:
            where = unit_columns(mask, param, axis, group)
            param.masked_fill_(where, 0.0)
            self._zero_state(param, where)
        self._restart_running_statistics(incoming, mask)
        self.monitor.on_reset(index, mask)
        self.resets[index] += mask.sum()

    def _restart_running_statistics(self, incoming: list[nn.Parameter], mask: torch.Tensor) -> None:
        """Running statistics of the reset channels, in the modules holding their incoming parameters, set
        to those of the scratch copy, which `fresh` has just re-initialised."""
        modules = {self.reinitializer.names[id(p)].rpartition(".")[0] for p in incoming}
        for name in sorted(modules):
            module, fresh = self.net.get_submodule(name), self.reinitializer.scratch.get_submodule(name)
            for key in ("running_mean", "running_var"):
                statistic = getattr(module, key, None)
                if isinstance(statistic, torch.Tensor) and statistic.shape == mask.shape:
                    statistic.copy_(torch.where(mask, getattr(fresh, key), statistic))

    @torch.no_grad()
    def eval_mean_abs(self) -> list[torch.Tensor]:
        """Mean |h| (float64) per unit of every group over the last step's training inputs × positions,
        the network in eval mode: the activation as a function of each input (a BatchNorm uses its
        running statistics, as at test time and in the dormant-unit covariate), not of its batch."""
        self.monitor.keep_step_inputs(self.net)
        inputs = self.monitor.step_inputs
        if not inputs:
            raise ConfigError("the last optimizer step ran no training-mode forward pass through the whole "
                              "network, so its units cannot be scored; the model must call its network on "
                              "the batch it learns from")
        sums = [torch.zeros(g.n_units, dtype=torch.float64, device=_device(g)) for g in self.groups]
        positions = [0] * len(self.groups)

        def hook(index: int):
            axis = self.groups[index].activation_axis

            def add(module, module_inputs, output: torch.Tensor) -> None:
                h = output.detach()
                group = self.groups[index]
                if group.activation_copies > 1:
                    magnitude = unit_activity(h, group)[0]
                    sums[index] += magnitude.sum(0, dtype=torch.float64)
                    positions[index] += magnitude.shape[0]
                    return
                dims = [d for d in range(h.dim()) if d != axis % h.dim()]
                sums[index] += h.abs().sum(dim=dims, dtype=torch.float64)
                positions[index] += h.numel() // group.n_units

            return add

        modes = {module: module.training for module in self.net.modules()}
        handles = [g.activation.register_forward_hook(hook(i)) for i, g in enumerate(self.groups)]
        try:
            self.net.eval()
            for x in inputs:
                self.net(x)
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
        return [s / max(n, 1) for s, n in zip(sums, positions)]

    def _zero_state(self, param: torch.Tensor, where: torch.Tensor) -> None:
        clear_optimizer_state(self.optimizer, param, where)

    def unit_mask(self, index: int, units: torch.Tensor) -> torch.Tensor:
        """Boolean mask of group `index` with the given unit indices set."""
        mask = torch.zeros(self.groups[index].n_units, dtype=torch.bool, device=units.device)
        return mask.index_fill_(0, units, True)

    def take_resets(self) -> dict[str, int]:
        """Resets per group since the last call (one device read per group)."""
        counts = {g.name: int(r.item()) for g, r in zip(self.groups, self.resets)}
        self.resets = [torch.zeros_like(r) for r in self.resets]
        return counts

    def outgoing_weight_sum(self, index: int) -> torch.Tensor:
        """Σ_k |w_out,k| per unit of group `index` over every parameter that reads the unit."""
        group = self.groups[index]
        total = 0
        for param, axis in group.outgoing:
            dims = [d for d in range(param.dim()) if d != axis]
            # under CReLU the sum runs over both columns that read the unit
            total = total + param.detach().abs().sum(dim=dims).view(-1, group.n_units).sum(0)
        return total


def clear_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                          where: torch.Tensor | None = None) -> None:
    """Zero the optimizer's per-entry state of `param` (momentum, Adam's moments) where `where` is True, or
    everywhere; per-tensor entries such as Adam's step count stay."""
    for value in optimizer.state.get(param, {}).values():
        if not (torch.is_tensor(value) and value.shape == param.shape):
            continue
        if where is None:
            value.zero_()
        else:
            value.masked_fill_(where, 0.0)
