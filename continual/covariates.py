"""Plasticity covariates: dead/dormant units, feature ranks, attention entropy, weight magnitudes, neuron ages,
gradient norm and distance from initialisation.

Definitions: dormant units as in ReDO (Sokar et al. 2023), effective rank (Roy & Vetterli 2007: exp of the
entropy of the singular values normalised to sum 1) and stable rank as Dohare et al. (Nature 2024) and
Plasticine use them (the number of singular values needed to reach 99% of their sum). All statistics come back as flat dicts of floats
whose keys are `<statistic>/<group>` per unit group (or attention block `L{i}`) plus an overall
`<statistic>` (or `<statistic>_mean`), ready to log as metrics.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from plasticity.redo import redo_scores

# A unit is "low activity" when it is active (> 0) on fewer than this fraction of (inputs × positions).
LOW_ACTIVITY = 0.01
# Stable rank (Dohare et al.): the number of singular values holding this fraction of their sum.
STABLE_RANK_MASS = 0.99


def singular_values_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of a matrix X from its Gram matrix XᵀX: σ = sqrt(max(λ, 0))."""
    eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64))
    return eigenvalues.clamp(min=0).sqrt().flip(0)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(−Σ p_k ln p_k) with p_k = σ_k / Σ σ_j (0·ln 0 = 0); 0 for an all-zero matrix."""
    sigma = singular_values.to(torch.float64).clamp(min=0)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    return math.exp(-torch.special.xlogy(p, p).sum().item())


def stable_rank(singular_values: torch.Tensor, mass: float = STABLE_RANK_MASS) -> float:
    """Smallest k with Σ_{i≤k} σ_i ≥ mass · Σ σ_j (σ sorted descending); 0 for an all-zero matrix."""
    sigma = singular_values.to(torch.float64).clamp(min=0).sort(descending=True).values
    total = sigma.sum()
    if total <= 0:
        return 0.0
    cumulative = sigma.cumsum(0)
    # Count the prefixes still below the threshold; the last prefix (the total) always reaches it.
    return float(min(int((cumulative < mass * total).sum().item()) + 1, sigma.numel()))


class _GroupAccumulator:
    """Per-unit positive counts, |h| sums and the feature Gram matrix of one unit group, over probe chunks."""

    def __init__(self, n_units: int, axis: int, device: torch.device, copies: int = 1):
        self.n_units = n_units
        self.axis = axis
        self.copies = copies  # outputs per unit (CReLU: 2), laid out as `copies` blocks of n_units
        self.positives = torch.zeros(n_units, dtype=torch.int64, device=device)
        self.abs_sum = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.rows = 0  # inputs × positions seen
        # The ranks are those of everything the layer outputs (2n features under CReLU).
        self.gram = torch.zeros(n_units * copies, n_units * copies, dtype=torch.float64, device=device)

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Forward hook: add one chunk's activations to the accumulators."""
        out = output.detach()
        units = out.movedim(self.axis, -1).reshape(-1, self.n_units * self.copies)
        # A unit fires when any of its outputs is positive; its activity is the sum of their |values|.
        blocks = units.reshape(-1, self.copies, self.n_units)
        self.positives += (blocks.amax(1) > 0).sum(0)
        self.abs_sum += blocks.abs().sum(1).sum(0, dtype=torch.float64)
        self.rows += units.shape[0]
        # Conv channels: the rank is that of the spatially averaged features [B, C].
        spatial = self.axis in (1, 1 - out.dim()) and out.dim() > 2
        features = out.mean(dim=tuple(range(2, out.dim()))) if spatial else units
        features = features.to(torch.float64)
        self.gram += features.T @ features

    def statistics(self, dormant_tau: float) -> dict[str, float | torch.Tensor]:
        """Per-group fractions (as tensors of flags for the overall sums) and ranks."""
        rows = max(self.rows, 1)
        # ReDO's own score (all zeros, so every unit dormant, when the whole layer is silent).
        dormant = redo_scores(self.abs_sum / rows) <= dormant_tau
        sigma = singular_values_from_gram(self.gram)
        return {
            "dead": self.positives == 0,
            "dormant": dormant,
            "low_activity": self.positives.to(torch.float64) < LOW_ACTIVITY * self.rows,
            "effective_rank": effective_rank(sigma),
            "stable_rank": stable_rank(sigma),
        }


class _AttentionAccumulator:
    """Sums of the normalised per-(input, head, query) attention entropy of one attention block."""

    def __init__(self):
        self.total: torch.Tensor | float = 0.0  # tensors once a chunk arrives (no host sync per chunk)
        self.total_sq: torch.Tensor | float = 0.0
        self.count = 0

    def hook(self, module: nn.Module, inputs) -> None:
        """Forward pre-hook on `attn_drop`: its input is the softmax attention [B, heads, T, T]."""
        attn = inputs[0].detach().to(torch.float64)
        tokens = attn.shape[-1]
        entropy = -torch.special.xlogy(attn, attn).sum(-1)
        # A uniform attention over T tokens has entropy ln T; a single token (T = 1) has 0.
        normalised = entropy / math.log(tokens) if tokens > 1 else entropy
        self.total = self.total + normalised.sum()
        self.total_sq = self.total_sq + normalised.square().sum()
        self.count += normalised.numel()

    def statistics(self) -> tuple[float, float]:
        """(mean, population std) of the normalised entropy; NaN when nothing was seen."""
        if self.count == 0:
            return math.nan, math.nan
        mean = float(self.total) / self.count
        variance = max(float(self.total_sq) / self.count - mean * mean, 0.0)
        return mean, math.sqrt(variance)


def _mean(values: list[float]) -> float:
    """Plain mean of a list of floats; NaN when empty."""
    return sum(values) / len(values) if values else math.nan


def _probe(backbone: nn.Module, images: torch.Tensor, batch_size: int):
    """Run the backbone in eval mode over the probe images with accumulators on every unit group and
    attention block; the modes, hooks and attention flags are restored afterwards."""
    groups = backbone.hidden_units()
    attention = list(backbone.attention_modules()) if hasattr(backbone, "attention_modules") else []
    parameter = next(backbone.parameters())
    device, dtype = parameter.device, parameter.dtype
    accumulators = [_GroupAccumulator(g.n_units, g.activation_axis, device, g.activation_copies) for g in groups]
    attention_accumulators = [_AttentionAccumulator() for _ in attention]

    modes = {module: module.training for module in backbone.modules()}
    fused = [module.fused_attn for module in attention]
    handles = []
    try:
        backbone.eval()
        for group, accumulator in zip(groups, accumulators):
            handles.append(group.activation.register_forward_hook(accumulator.hook))
        for module, accumulator in zip(attention, attention_accumulators):
            module.fused_attn = False  # only the unfused path materialises the attention probabilities
            handles.append(module.attn_drop.register_forward_pre_hook(accumulator.hook))
        for start in range(0, images.shape[0], batch_size):
            backbone(images[start:start + batch_size].to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in zip(attention, fused):
            module.fused_attn = flag
        for module, training in modes.items():
            module.training = training
    return groups, accumulators, attention_accumulators


@torch.no_grad()
def dormant_units(backbone: nn.Module, images: torch.Tensor, dormant_tau: float,
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per unit group, the flags of the units that `dormant_frac` counts as dormant on the probe images."""
    groups, accumulators, _ = _probe(backbone, images, batch_size)
    return {g.name: a.statistics(dormant_tau)["dormant"] for g, a in zip(groups, accumulators)}


@torch.no_grad()
def probe_statistics(backbone: nn.Module, images: torch.Tensor, dormant_tau: float,
                     batch_size: int = 256) -> dict[str, float]:
    """Dead/dormant/low-activity fractions, effective/stable ranks and attention entropy on probe images.

    The backbone runs in eval mode: a unit's activation is a function of each input (a BatchNorm uses its
    running statistics), as in ReDO's score, which `--plasticity redo` also measures in eval mode.
    """
    groups, accumulators, attention_accumulators = _probe(backbone, images, batch_size)
    result: dict[str, float] = {}
    flags = {"dead": [], "dormant": [], "low_activity": []}
    ranks = {"effective_rank": [], "stable_rank": []}
    for group, accumulator in zip(groups, accumulators):
        stats = accumulator.statistics(dormant_tau)
        for kind, kind_flags in flags.items():
            result[f"{kind}_frac/{group.name}"] = stats[kind].to(torch.float64).mean().item()
            kind_flags.append(stats[kind])
        for kind, values in ranks.items():
            result[f"{kind}/{group.name}"] = stats[kind]
            values.append(stats[kind])
    for kind, kind_flags in flags.items():
        everything = torch.cat(kind_flags) if kind_flags else torch.zeros(0, dtype=torch.bool)
        result[f"{kind}_frac"] = everything.to(torch.float64).mean().item() if everything.numel() else math.nan
    for kind, values in ranks.items():
        result[f"{kind}_mean"] = _mean(values)

    if attention_accumulators:
        means = []
        for i, accumulator in enumerate(attention_accumulators):
            mean, std = accumulator.statistics()
            result[f"attn_entropy_mean/L{i}"] = mean
            result[f"attn_entropy_std/L{i}"] = std
            means.append(mean)
        result["attn_entropy_mean"] = _mean(means)
    return result


@torch.no_grad()
def weight_magnitudes(backbone: nn.Module) -> dict[str, float]:
    """Mean |w| of every parameter with dim ≥ 2 (`weight_mean_abs/<name>`) and over all of them together."""
    result: dict[str, float] = {}
    total, count = 0.0, 0
    for name, parameter in backbone.named_parameters():
        if parameter.dim() < 2:
            continue
        abs_sum = parameter.detach().abs().sum(dtype=torch.float64).item()
        result[f"weight_mean_abs/{name}"] = abs_sum / parameter.numel()
        total += abs_sum
        count += parameter.numel()
    result["weight_mean_abs"] = total / count if count else math.nan
    return result


def gradient_norm(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """‖∇θ L‖₂: the L2 norm, over every trainable parameter, of the gradient of the mean cross-entropy of the
    probe examples (labels over all of the network's outputs). The network runs in eval mode, so measuring
    changes no BatchNorm statistic; the parameters' .grad are left as they were."""
    params = [p for p in backbone.parameters() if p.requires_grad]
    was_training = backbone.training
    backbone.eval()
    try:
        total = [torch.zeros_like(p) for p in params]
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            loss = nn.functional.cross_entropy(backbone(x), y, reduction="sum") / len(images)
            for acc, grad in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if grad is not None:
                    acc += grad
    finally:
        backbone.train(was_training)
    return math.sqrt(sum(g.double().pow(2).sum().item() for g in total))


@torch.no_grad()
def distance_from_init(backbone: nn.Module, initial: list[torch.Tensor]) -> dict[str, float]:
    """‖θ − θ₀‖₂ over every parameter (θ₀ the parameters the network was initialised with), and the same
    divided by ‖θ₀‖₂."""
    params = list(backbone.parameters())
    squared = sum((p.double() - p0.double()).pow(2).sum().item() for p, p0 in zip(params, initial, strict=True))
    norm0 = math.sqrt(sum(p0.double().pow(2).sum().item() for p0 in initial))
    distance = math.sqrt(squared)
    return {"distance_from_init": distance, "distance_from_init_rel": distance / norm0 if norm0 else math.nan}


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """torch.quantile's linear interpolation on an ascending 1-D tensor (no size limit); NaN when empty."""
    n = sorted_values.numel()
    if n == 0:
        return math.nan
    position = q * (n - 1)
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    low, high = sorted_values[lower].item(), sorted_values[upper].item()
    return low + (high - low) * (position - lower)


def age_statistics(ages: dict[str, torch.Tensor], unit: str) -> dict[str, float]:
    """Mean, median, 90th percentile and max of neuron ages per group; mean and p90 over all units."""
    result: dict[str, float] = {}
    everything = []
    for name, group_ages in ages.items():
        values = torch.as_tensor(group_ages).detach().flatten().to(torch.float64).sort().values
        everything.append(values.cpu())
        empty = values.numel() == 0
        result[f"age_{unit}_mean/{name}"] = math.nan if empty else values.mean().item()
        result[f"age_{unit}_median/{name}"] = _quantile(values, 0.5)
        result[f"age_{unit}_p90/{name}"] = _quantile(values, 0.9)
        result[f"age_{unit}_max/{name}"] = math.nan if empty else values[-1].item()
    values = torch.cat(everything).sort().values if everything else torch.zeros(0, dtype=torch.float64)
    result[f"age_{unit}_mean"] = values.mean().item() if values.numel() else math.nan
    result[f"age_{unit}_p90"] = _quantile(values, 0.9)
    return result
