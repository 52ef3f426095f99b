"""How many CPU threads a run's tensor operations use (`--num_threads`), and why.

PyTorch's default is one thread per core, and its OpenMP threads spin while they wait for work. On
a machine whose cores are busy with other jobs, the spinning threads compete with those jobs and
with each other: a small network then trains many times slower than on one thread
(`benchmarks/threads.py`, figures in benchmarks/README.md). A network whose training step is little
arithmetic gains nothing from more threads even on an idle machine, since each of its operations is
too short to split. So the default uses every free core only when a step is enough work to gain from
them (counted, not guessed from the parameters: a small ViT has few parameters and much work), on
cores that are free.
"""
from __future__ import annotations

import os

# Arithmetic per training step (forward and backward, FLOPs) below which one thread is as fast as several,
# even on an idle machine: the operations are too short to split (benchmarks/threads.py, benchmarks/README.md:
# the 100-100 MLPs of seq-digits and seq-mnist, 3-5 MFLOPs a step, gain nothing from a second core; a
# 400-400 MLP at 92 MFLOPs gains 1.26x, the 3-layer ViT at 3.3 GFLOPs with under 1M parameters 1.66x).
# The threshold lies between the measured 5 and 92, near their geometric mean.
SMALL_STEP_FLOPS = 20e6


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or container allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def step_flops(net, shape: tuple[int, ...], batch_size: int, device: str = "cpu") -> float:
    """FLOPs of one training step of `net` on a batch: three times its forward pass (forward, and the
    backward's two products per layer), counted by torch's FlopCounterMode on one example in eval mode
    (no statistics change)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *shape, device=device))
    finally:
        net.train(was_training)
    return 3.0 * counter.get_total_flops() * batch_size


def choose_threads(requested: int, flops_per_step: float) -> tuple[int, str]:
    """The thread count to use and the reason, as the run's log states it.

    `requested` > 0 is used as given; 0 chooses: one thread when a training step is under
    SMALL_STEP_FLOPS, otherwise the cores the machine's one-minute load average leaves free, at least one.
    """
    cores = usable_cores()
    if requested > 0:
        return requested, f"--num_threads {requested}"
    if flops_per_step < SMALL_STEP_FLOPS:
        return 1, f"a training step of {flops_per_step / 1e6:.1f} MFLOPs runs fastest on one thread"
    load = os.getloadavg()[0]
    free = max(1, min(cores, int(cores - load + 0.5)))
    return free, (f"a training step of {flops_per_step / 1e9:.2f} GFLOPs; {cores} usable cores with a load "
                  f"average of {load:.1f} leave {free} free")
