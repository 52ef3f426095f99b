"""One plasticity method's model, timed step by step, for benchmarks/plasticity_overhead.py.

`Bench` builds the model as main.py builds it and trains it as the task loop does (`observe`, then
the model's lifecycle step), with timers around the plasticity calls and the UnitMonitor's
forward hooks; `profile` shows the operators run inside them; `proposed_hook` is the --prototype
statistics hook (a change proposed for utils/units.py, not library code).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from unittest import mock

import torch
from torch import nn

from backbones import BACKBONES
from benchmarks._timing import timed
from continual.args import parse_args
from continual.run import set_seed
from models import MODELS
from plasticity import PLASTICITY
from plasticity._hidden_units import UnitMonitor

HOOKS = "plasticity.statistics_hooks"  # profiler label around the UnitMonitor's forward hooks
PROPOSED = " + proposed hook"  # row suffix of --prototype rows


def proposed_hook(self: UnitMonitor, index: int):
    """UnitMonitor._hook with the positive count summed as floats, sign(h) clamped at 0, instead of through a
    bool tensor (which `sum` first casts to int64, a full-size copy), and Σ|h| as Σh behind a ReLU, whose
    outputs are never negative. Prototype, not library code."""
    group = self.groups[index]
    nonnegative = isinstance(group.activation, nn.ReLU)

    def hook(module, inputs, output: torch.Tensor) -> None:
        if not module.training:
            return
        h = output.detach()
        axis = group.activation_axis % h.dim()
        dims = [d for d in range(h.dim()) if d != axis]
        self.abs_sum[index] += (h if nonnegative else h.abs()).sum(dim=dims)
        self.positive[index] += h.sign().clamp_(min=0).sum(dim=dims)
        self.positions[index] += h.numel() // group.n_units

    return hook


class Bench:
    """One method's model built as main.py builds it from `argv`, with timers around the plasticity calls."""

    def __init__(self, argv: list[str], method: str, dataset, proposed: bool = False):
        self.name = f"{method}{PROPOSED if proposed else ''}"
        self.args = parse_args(argv)
        set_seed(self.args.seed)  # the same initialisation for every method (l2init's θ₀ included)
        backbone = BACKBONES.get(self.args.backbone)(self.args, dataset.SHAPE, dataset.N_CLASSES)
        with mock.patch.object(UnitMonitor, "_hook", proposed_hook) if proposed else contextlib.nullcontext():
            self.model = MODELS.get(self.args.model)(backbone.to(self.args.device), dataset, self.args)
        self.model.train()
        self.plasticity_seconds = 0.0  # inside the methods' events (CPU only: CUDA runs them async)
        self.label = None  # set in profile mode: record_function labels around the calls
        plasticity = self.model.plasticity
        for method in plasticity.methods:  # the events the lifecycle sends them, and the step's unit statistics
            for name in ("after_backward", "after_step"):
                setattr(method, name, self._timed(getattr(method, name), f"plasticity.{name}"))
        plasticity.end_step = self._timed(plasticity.end_step, "plasticity.after_step")
        self.hook_seconds = 0.0  # inside the UnitMonitor's forward hooks (timed by hooks just before and after)
        if plasticity.units is not None:
            for group in plasticity.units.groups:
                group.activation.register_forward_hook(self._hook_start, prepend=True)
                group.activation.register_forward_hook(self._hook_stop)
        self.step = 0

    def _hook_start(self, module, inputs, output) -> None:
        if self.label:
            self._scope = torch.profiler.record_function(HOOKS)
            self._scope.__enter__()
        self._hook_started = time.perf_counter()

    def _hook_stop(self, module, inputs, output) -> None:
        self.hook_seconds += time.perf_counter() - self._hook_started
        if self.label:
            self._scope.__exit__(None, None, None)

    def _timed(self, call, label: str):
        def wrapper(*args):
            start = time.perf_counter()
            if self.label:
                with torch.profiler.record_function(label):
                    call(*args)
            else:
                call(*args)
            self.plasticity_seconds += time.perf_counter() - start
        return wrapper

    def method(self, name: str):
        cls = PLASTICITY.get(name)
        return next((m for m in self.model.plasticity.methods if isinstance(m, cls)), None)

    def train(self, batches, steps: int) -> None:
        """`steps` steps of task 0 as the task loop takes them: the loss from `observe`, then the optimizer step."""
        for _ in range(steps):
            inputs, raw, labels, indices = batches[self.step % len(batches)]
            loss = self.model.lifecycle.observe(inputs, labels, raw, indices, 0)
            self.model.lifecycle.step(loss)
            self.step += 1

    def take_resets(self) -> int:
        units = self.model.plasticity.units
        return sum(units.take_resets().values()) if units is not None else 0

    def bring_forward(self, steps: int) -> None:
        """The method's state as if it had run `steps` steps already: cbp's units are that much older."""
        cbp = self.method("cbp")
        if cbp is not None:
            for age in cbp.age:
                age += steps

    def settle(self, batches, steps: int, force_estimate: bool) -> None:
        """Train `steps` steps of its own; snr and snr_v2 estimate their thresholds at the last one if forced."""
        forced = [(flag, getattr(self.args, flag)) for flag in ("snr_update_prob", "snr2_update_prob")
                  if force_estimate and self.method({"snr_update_prob": "snr", "snr2_update_prob": "snr_v2"}[flag])]
        if steps > 1:
            self.train(batches, steps - 1)
        for flag, _ in forced:
            setattr(self.args, flag, 1.0)
        self.train(batches, 1)
        for flag, value in forced:
            setattr(self.args, flag, value)
        self.take_resets()

    def state(self) -> str:
        """What the method's own state allows: mature cbp units, snr/snr_v2 units with a finite threshold."""
        parts = []
        cbp = self.method("cbp")
        if cbp is not None:
            mature = sum(int((age > self.args.cbp_maturity).sum()) for age in cbp.age)
            parts.append(f"{mature}/{sum(len(age) for age in cbp.age)} units mature")
        for name in ("snr", "snr_v2"):
            method = self.method(name)
            if method is not None:
                finite = sum(int(torch.isfinite(tau).sum()) for tau in method.tau)
                parts.append(f"{finite}/{sum(len(tau) for tau in method.tau)} finite thresholds")
        return f"{self.name}: {', '.join(parts)}" if parts else ""

    def block(self, batches, steps: int) -> tuple[float, float, float, int]:
        """Per step: seconds, seconds inside the plasticity calls and inside the statistics hooks; and the
        resets of the block."""
        self.take_resets()
        calls, hooks = self.plasticity_seconds, self.hook_seconds
        wall = timed(lambda: self.train(batches, steps), self.args.device)
        return (wall / steps, (self.plasticity_seconds - calls) / steps,
                (self.hook_seconds - hooks) / steps, self.take_resets())


def profile(bench: Bench, batches, steps: int) -> None:
    """torch.profiler over `steps` steps: the operators run inside the statistics hooks and the plasticity
    calls, by self CPU time per step."""
    bench.label = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bench.train(batches, steps)
    bench.label = None
    bench.take_resets()
    events = prof.events()
    step_total = sum(e.self_cpu_time_total for e in events) / steps
    scopes = {HOOKS: 0.0, "plasticity.after_backward": 0.0, "plasticity.after_step": 0.0}
    ops, calls = defaultdict(float), defaultdict(int)
    for event in events:
        if event.name in scopes:
            scopes[event.name] += event.cpu_time_total / steps
        parent = event.cpu_parent
        while parent is not None and parent.name not in scopes:
            parent = parent.cpu_parent
        scope = event.name if event.name in scopes else parent.name if parent is not None else None
        if scope is not None:
            key = (scope, "(Python between operators)" if event.name in scopes else event.name)
            ops[key] += event.self_cpu_time_total / steps
            calls[key] += 1
    print(f"\nprofile of {bench.name} on {bench.args.vit_depth} blocks over {steps} steps: {step_total:.0f} µs of "
          f"CPU per step under the profiler, of which "
          + ", ".join(f"{label} {total:.0f} µs" for label, total in scopes.items()))
    print(f"  {'scope':<24}{'operator':<42}{'µs/step':>10}{'calls/step':>12}")
    for (scope, name), micros in sorted(ops.items(), key=lambda item: -item[1])[:20]:
        per_step = calls[(scope, name)] / steps
        print(f"  {scope.removeprefix('plasticity.'):<24}{name:<42}{micros:>10.0f}{per_step:>12.1f}")
