"""K `mlp` backbones trained as one: stacked weights, batched products, and the backward pass written out.

Each layer's weights are stacked as [K, out, in] (nn.Linear's layout) and the activations are kept as
[K, features, batch], so every product of a step has the batch as its last dimension. On the CPU that
orientation matters: a product whose result has the 10 classes as its last dimension ran 4-10 times slower
in MKL's batched kernel than the same product with the batch there (benchmarks/README.md). The backward
pass of an MLP with ReLUs and a cross-entropy loss is five formulas, written out below with preallocated
gradients: autograd's bookkeeping, its transposes and copies took about a sixth of a step at these sizes.
The loss's gradient is softmax minus the (smoothed) one-hot label, its 1/B applied by each gradient's own
product (`alpha`); the loss itself is only computed when the caller reads it.
SGD without Nesterov's correction (train_splits.py's default) is written out too: each weight gradient's
product adds itself to the momentum buffer in its own kernel (`baddbmm_` with beta = momentum), and the
step is p -= lr · buffer, one foreach update. That is torch's SGD update without writing the gradients and
reading them back (at K=16 the first layer's weights, gradients and momentum are 3 MB, beyond a core's L2
cache): a step took 1156 µs instead of 1630. Any other optimizer is torch's, fused (one pass over each
parameter). A step writes its activations and gradients into tensors kept from the steps before: tensors
of these sizes, allocated afresh, went back to the system after each step, and touching their pages again
cost as much as the products. On the CPU the passes between the products (the bias with the ReLU, ReLU's
backward with the bias's gradient, the label's subtraction from the softmax with the last bias's gradient and
each example's correctness) are numba kernels of one pass each, at the end of this file.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from utils.optimizers import build_optimizer


class Kept(NamedTuple):
    """A tensor a step writes, kept from one step to the next, with its views: [K, B, features] for an
    activation kept as [K, features, B], and numpy's on the CPU."""

    tensor: torch.Tensor
    transposed: torch.Tensor
    array: np.ndarray | None


class StackedMLP:
    """The same contract as the vmapped `Ensemble` (memorization/training.py) and the same initial weights:
    `__call__` maps [K, B, ...] inputs (or one [B, ...] batch shared by every model) to [K, B, classes] logits,
    `train_step` makes one optimizer step of every model on its own batch. Everything is float32 on every
    device (bf16 autocast is turned off here): these products are small and the MLP gains nothing from it.
    On the CPU a model trained here has the same bits alone as in any place of its group, odd batches included
    (tests/test_stacked_mlp.py); kernels whose rounding depends on where a model's slice lies in memory (a
    matrix-vector product for the bias's gradient did) are kept out for that. The plan fixes the groups anyway.
    """

    def __init__(self, nets: list[nn.Module], training: argparse.Namespace):
        self.size = len(nets)
        layers = [[*net.layers, net.head] for net in nets]
        self.weights = [torch.stack([layer.weight.detach() for layer in same]) for same in zip(*layers)]
        self.biases = [torch.stack([layer.bias.detach()[:, None] for layer in same]) for same in zip(*layers)]
        self.parameters = self.weights + self.biases
        self.sgd_in_products = training.optimizer == "sgd" and not getattr(training, "optim_nesterov", False)
        self.momentum, self.weight_decay = float(training.optim_mom), float(training.optim_wd)
        # Written in place by every step: the momentum buffers of the SGD below, or the gradients for torch's.
        self.momentum_buffers = [torch.zeros_like(p) for p in self.parameters] if self.sgd_in_products else []
        if self.sgd_in_products:  # torch's optimizer only holds the learning rate for the schedule
            self.optimizer = build_optimizer(self.parameters, training, fused=True)
        else:
            # torch's optimizer steps each model's slice as a tensor of its own: a fused kernel's vector loop
            # rounds the elements of its tail otherwise (no FMA there), so a model's bits would depend on
            # where its slice lies in the stacked tensor (AVX-512 CPUs showed it).
            views = []
            for parameter in self.parameters:
                parameter.grad = torch.zeros_like(parameter)
                for m in range(self.size):
                    view = parameter[m]
                    view.grad = parameter.grad[m]
                    views.append(view)
            self.optimizer = build_optimizer(views, training, fused=True)
        self.smoothing = float(training.label_smoothing)
        self._target = torch.full((1, 1, 1), -(1 - self.smoothing), device=self.weights[0].device)
        self._kept: dict[int, tuple[list[Kept], list[Kept]]] = {}  # by batch size: see `_step_tensors`
        # The passes around the products: numba's kernels below on the CPU, torch's operators elsewhere.
        self.cpu_kernels = self.weights[0].device.type == "cpu"
        # Views made once: in the training loop, where the products have pushed torch's dispatcher out of the
        # caches, each `.transpose` or `.numpy()` cost 5-15 µs. The weights transposed; on the CPU numpy's views
        # of the tensors the kernels read and write: each layer's bias, and where its gradient goes with the
        # factor on what is there.
        self._weights_transposed = [weight.transpose(1, 2) for weight in self.weights]
        if self.cpu_kernels:
            self._bias_arrays = [bias.numpy() for bias in self.biases]
            self._bias_targets = [(target.numpy(), beta) for target, beta in map(self._bias_gradient, range(len(self.biases)))]
            self._no_correct = np.empty((0, 0), dtype=np.bool_)  # where the kernel writes no correctness

    def _step_tensors(self, batch: int) -> tuple[list[Kept], list[Kept]]:
        """The float32 tensors a step of this batch size writes, the same from one step to the next: every
        layer's output [K, out, B], and the gradient of every layer's input but the first's [K, in, B]."""
        if batch not in self._kept:
            def kept(features: int) -> Kept:
                tensor = torch.empty(self.size, features, batch, device=self.weights[0].device)
                return Kept(tensor, tensor.transpose(1, 2), tensor.numpy() if self.cpu_kernels else None)
            self._kept[batch] = ([kept(weight.shape[1]) for weight in self.weights],
                                 [kept(weight.shape[2]) for weight in self.weights[1:]])
        return self._kept[batch]

    def train(self, mode: bool = True) -> None:
        """No dropout or BatchNorm in the mlp: training and evaluation compute the same function."""

    def _forward(self, inputs: torch.Tensor, kept: list[Kept] | None = None) -> list[torch.Tensor]:
        """Every layer's output, [K, features, B], from the [K, in, B] inputs (first entry: the inputs);
        written into `kept` (a step's outputs, `_step_tensors`) when given."""
        outputs = [inputs]
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            out, _, array = kept[i] if kept else (None, None, None)
            if i == len(self.weights) - 1:
                outputs.append(torch.baddbmm(bias, weight, outputs[-1], out=out))  # the bias in the product
            elif not self.cpu_kernels:
                outputs.append(torch.baddbmm(bias, weight, outputs[-1], out=out).relu_())
            else:  # the bias and the ReLU in one pass: baddbmm first copies the bias into its output
                out = torch.bmm(weight, outputs[-1], out=out)
                _add_bias_relu(out.numpy() if array is None else array, self._bias_arrays[i])
                outputs.append(out)
        return outputs

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        inputs = x.flatten(1).T.expand(self.size, -1, -1) if shared_input else x.flatten(2).transpose(1, 2)
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(inputs.float())[-1].transpose(1, 2)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, with_loss: bool = True,
                   correct: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step on model k's batch x[k] with labels y[k] ([K, B]): the loss (sum over models of each
        model's mean cross-entropy, with the recipe's label smoothing; None unless `with_loss`) and the logits
        of the forward pass, [K, B, classes], a view of a tensor the next step overwrites; `correct` [K, B]
        (bool), when given, receives whether each example's prediction (the first of equal maxima, as argmax's)
        is its label: on the CPU the loss gradient's kernel finds it with the softmax's maximum. Each model's
        gradient is that of its own mean loss, as autograd would give it. No tensor here requires a gradient,
        so autograd records nothing without a no_grad context; an autocast context is only left when one is on
        (entering each cost 3-5 µs a step)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.train_step(x, y, with_loss, correct)
        flat = x.flatten(2)  # [K, B, in]
        flat = flat if flat.dtype == torch.float32 else flat.float()
        kept_outputs, kept_grads = self._step_tensors(flat.shape[1])
        logits = self._forward(flat.transpose(1, 2), kept_outputs)[-1]  # [K, classes, B]
        transposed = [flat] + [output.transposed for output in kept_outputs[:-1]]  # each layer's input, [K, B, in]
        # torch's cross-entropy reads [K, classes, B] as [N, C, d1]: each model's mean over its batch, summed
        loss = (F.cross_entropy(logits, y, reduction="none", label_smoothing=self.smoothing).mean(1).sum()
                if with_loss else None)
        scale = 1 / logits.shape[2]  # applied in every gradient's own kernel (exact for a batch that is a power of 2)
        grad = self._loss_gradient(kept_outputs[-1], y, scale, correct)
        for i in reversed(range(len(self.weights))):
            if self.sgd_in_products:  # momentum buffer = momentum · buffer + gradient, in the product
                self.momentum_buffers[i].baddbmm_(grad, transposed[i], beta=self.momentum, alpha=scale)
            else:
                self.weights[i].grad.baddbmm_(grad, transposed[i], beta=0, alpha=scale)
            if i > 0:  # through the product, then the ReLU: zero where its output was zero
                grad = torch.bmm(self._weights_transposed[i], grad, out=kept_grads[i - 1].tensor)
                self._relu_backward(kept_grads[i - 1], kept_outputs[i - 1], i - 1, scale)
        if self.sgd_in_products:
            self._sgd_step()
        else:
            self.optimizer.step()
        return loss, kept_outputs[-1].transposed

    def _bias_gradient(self, layer: int) -> tuple[torch.Tensor, float]:
        """Where `layer`'s bias gradient goes, and the factor on what is there already: its momentum buffer
        (buffer = momentum · buffer + gradient, as the weights' products do) or its gradient for torch's optimizer."""
        if self.sgd_in_products:
            return self.momentum_buffers[len(self.weights) + layer], self.momentum
        return self.biases[layer].grad, 0.0

    def _add_bias_gradient(self, layer: int, grad: torch.Tensor, scale: float) -> None:
        """torch's operators: `layer`'s bias gradient, scale · grad summed over the batch, into its place.
        Not a matrix-vector product with ones for the sum (faster): its rounding depended on where a model's rows
        lay in memory, so a model's bits on its place in the group."""
        target, beta = self._bias_gradient(layer)
        if beta:
            target.mul_(beta).add_(grad.sum(2, keepdim=True), alpha=scale)
        else:
            torch.mul(grad.sum(2, keepdim=True), scale, out=target)

    def _loss_gradient(self, logits: Kept, y: torch.Tensor, scale: float, correct: torch.Tensor | None
                       ) -> torch.Tensor:
        """B · d loss / d logits = softmax - the smoothed one-hot label, [K, classes, B]; the last bias's
        gradient (scale · its sum over the batch) goes to its place, and the correctness to `correct`."""
        layer = len(self.weights) - 1
        grad = torch.softmax(logits.tensor, 1)  # torch's: its exp is vectorised, numba's took 2.5 times as long here
        if self.cpu_kernels:
            _subtract_target_and_sum(grad.numpy(), logits.array, y.numpy(), self.smoothing, *self._bias_targets[layer],
                                     scale, self._no_correct if correct is None else correct.numpy())
            return grad
        if correct is not None:
            torch.eq(logits.tensor.argmax(1), y, out=correct)
        labels = y.unsqueeze(1)
        grad.scatter_add_(1, labels, self._target.expand_as(labels))
        if self.smoothing:
            grad -= self.smoothing / grad.shape[1]
        self._add_bias_gradient(layer, grad, scale)
        return grad

    def _relu_backward(self, grad: Kept, output: Kept, layer: int, scale: float) -> None:
        """`grad` through the ReLU of `layer`, whose output was `output` (zero where that was zero), in place;
        that layer's bias gradient (scale · its sum over the batch) goes to its place."""
        if self.cpu_kernels:
            _relu_backward_and_sum(grad.array, output.array, *self._bias_targets[layer], scale)
            return
        torch.ops.aten.threshold_backward.grad_input(grad.tensor, output.tensor, 0, grad_input=grad.tensor)
        self._add_bias_gradient(layer, grad.tensor, scale)

    def _sgd_step(self) -> None:
        """p -= lr · buffer for every parameter, weight decay added to the buffer first (torch's SGD,
        dampening 0); the buffers already hold momentum · buffer + gradient."""
        lr = self.optimizer.param_groups[0]["lr"]  # as the learning-rate schedule set it
        if self.weight_decay:
            torch._foreach_add_(self.momentum_buffers, self.parameters, alpha=self.weight_decay)
        torch._foreach_add_(self.parameters, self.momentum_buffers, alpha=-lr)


# The CPU's kernels for the passes around the products, each one pass where torch's operators took two to four
# (K=16, 256 hidden units, batch 32, CPU µs of each alone: ReLU's backward with the bias's sum 21 against 49,
# the label with the sum 14 against 21, each example's correctness found there too about 6 more, the bias with
# the ReLU after `bmm` 231 against 229 for `baddbmm` and ReLU; a numba call costs about 10 µs of that). In a
# training step the three took 5% off (bias and ReLU 2.3% of it). Each (model, unit) row is summed over the batch in an order fixed by the batch size alone, so a
# model's bits do not depend on its place in the group; a NaN passes through as through torch's operators (only
# `reassoc` is relaxed).
@numba.njit(cache=True, fastmath={"reassoc"})
def _add_bias_relu(out: np.ndarray, bias: np.ndarray) -> None:
    """out = relu(out + bias), in place; out [K, H, B], bias [K, H, 1]."""
    for k in range(out.shape[0]):
        for j in range(out.shape[1]):
            shift = bias[k, j, 0]
            for b in range(out.shape[2]):
                value = out[k, j, b] + shift
                out[k, j, b] = np.float32(0) if value <= 0 else value


@numba.njit(cache=True)
def _accumulate(target: np.ndarray, k: int, j: int, beta: float, alpha: float, total: np.float32) -> None:
    """target[k, j, 0] = beta · target[k, j, 0] + alpha · total; only alpha · total where beta is 0 (as a
    product's beta: what was there, a NaN included, is not read)."""
    target[k, j, 0] = alpha * total if beta == 0 else beta * target[k, j, 0] + alpha * total


@numba.njit(cache=True, fastmath={"reassoc"})
def _relu_backward_and_sum(grad: np.ndarray, output: np.ndarray, target: np.ndarray, beta: float,
                           alpha: float) -> None:
    """grad = 0 where output <= 0 (torch's threshold_backward), in place; its sum over B goes to `target`
    [K, H, 1] as in `_accumulate`."""
    for k in range(grad.shape[0]):
        for j in range(grad.shape[1]):
            total = np.float32(0)
            for b in range(grad.shape[2]):
                value = np.float32(0) if output[k, j, b] <= 0 else grad[k, j, b]
                grad[k, j, b] = value
                total += value
            _accumulate(target, k, j, beta, alpha, total)


@numba.njit(cache=True, fastmath={"reassoc"})
def _subtract_target_and_sum(grad: np.ndarray, logits: np.ndarray, labels: np.ndarray, smoothing: float,
                             target: np.ndarray, beta: float, alpha: float, correct: np.ndarray) -> None:
    """grad [K, C, B] (the softmax of the logits [K, C, B]) -= the smoothed one-hot labels [K, B], in place; its
    sum over B goes to `target` [K, C, 1] as in `_accumulate`; correct[k, b] = whether the first of the largest
    logits is the label (unless `correct` is empty)."""
    n_classes = grad.shape[1]
    hit, spread = np.float32(1 - smoothing), np.float32(smoothing / n_classes)
    for k in range(grad.shape[0]):
        for b in range(grad.shape[2]):
            label = labels[k, b]
            if label < 0 or label >= n_classes:
                raise IndexError("a label is outside the model's classes")
            grad[k, label, b] -= hit
            if correct.size:
                top, best = logits[k, 0, b], 0
                for c in range(1, n_classes):
                    if logits[k, c, b] > top:
                        top, best = logits[k, c, b], c
                correct[k, b] = best == label
        for c in range(n_classes):
            total = np.float32(0)
            for b in range(grad.shape[2]):
                value = grad[k, c, b] - spread
                grad[k, c, b] = value
                total += value
            _accumulate(target, k, c, beta, alpha, total)
