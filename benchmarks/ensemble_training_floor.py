"""The arithmetic floor of an MLP ensemble for benchmarks/ensemble_training.py.

The floor is an ensemble's matrix-multiply FLOPs (forward, weight gradients and the input gradients of
every layer but the first, plus the evaluation passes) at the rate `torch.bmm` reaches on the same
[K, ...] shapes, measured in the same process. Each product is timed both ways round (C = A @ B, and its
transpose C^T = B^T @ A^T, contiguous operands each time) and counted at the faster: on the CPU a
product whose result has the classes as its last dimension is several times slower than its transpose,
so the floor is what the products cost in their better orientation, whichever an engine uses.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from benchmarks._timing import timed
from memorization.plan import Plan
from memorization.training import PlanData

MATMUL_CALLS = 50  # one step's matmuls run this many times per timed burst of the floor measurement


def layer_widths(plan: Plan, data: PlanData) -> list[int]:
    hidden = [int(w) for w in str(plan.settings["backbone_args"]["mlp_hidden"]).split(",") if w]
    return [math.prod(data.dataset.SHAPE), *hidden, data.dataset.N_CLASSES]


def step_matmuls(widths: list[int], batch: int) -> list[tuple[int, int, int]]:
    """The (rows, inner, cols) of each matrix product one training step runs per model.

    Forward x @ W per layer; backward the weight gradient x^T @ g per layer, and the input gradient
    g @ W^T for every layer but the first (the images do not require a gradient).
    """
    layers = list(zip(widths[:-1], widths[1:]))
    forward = [(batch, n_in, n_out) for n_in, n_out in layers]
    weight_grads = [(n_in, batch, n_out) for n_in, n_out in layers]
    input_grads = [(batch, n_out, n_in) for n_in, n_out in layers[1:]]
    return forward + weight_grads + input_grads


def flops(shapes: list[tuple[int, int, int]]) -> int:
    return sum(2 * rows * inner * cols for rows, inner, cols in shapes)


def ensemble_flops_per_model(plan: Plan, widths: list[int]) -> float:
    """One model's matmul FLOPs over the whole run: training steps plus the recorded evaluation passes."""
    training = plan.settings["training"]
    per_example_step = flops(step_matmuls(widths, 1))
    per_example_forward = flops(step_matmuls(widths, 1)[:len(widths) - 1])
    examples_per_epoch = int(plan.inclusion_mask[0].sum())
    evaluated = plan.settings["n_train"] + plan.settings["n_test"]
    return (training["n_epochs"] * examples_per_epoch * per_example_step
            + len(training["record_epochs"]) * evaluated * per_example_forward)


def matmul_rate(widths: list[int], batch: int, n_models: int, device: str, bursts: int = 5,
                clock=time.perf_counter) -> float:
    """FLOP/s of one training step's products as torch.bmm on [K, ...] operands, each product in its faster
    orientation (median of bursts per product and orientation).

    bf16 on CUDA, where train_group runs under bf16 autocast; float32 elsewhere.
    """
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    shapes = step_matmuls(widths, batch)
    seconds = 0.0
    for rows, inner, cols in shapes:
        per_orientation = []
        for left_shape, right_shape in (((rows, inner), (inner, cols)), ((cols, inner), (inner, rows))):
            left = torch.randn(n_models, *left_shape, device=device, dtype=dtype)
            right = torch.randn(n_models, *right_shape, device=device, dtype=dtype)

            def burst() -> None:
                for _ in range(MATMUL_CALLS):
                    torch.bmm(left, right)

            # the first burst warms up and is not counted
            times = [timed(burst, device, clock) / MATMUL_CALLS for _ in range(bursts + 1)][1:]
            per_orientation.append(statistics.median(times))
        seconds += min(per_orientation)
    return n_models * flops(shapes) / seconds
