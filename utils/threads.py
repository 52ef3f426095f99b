"""How many CPU threads a run's tensor operations use (`--num_threads`), and why.

PyTorch's default is one thread per core, and its OpenMP threads spin while they wait for work. On
a machine whose cores are busy with other jobs, the spinning threads compete with those jobs and
with each other: a small network then trains many times slower than on one thread
(`benchmarks/threads.py`, figures in benchmarks/README.md). A small network gains nothing from more
threads even on an idle machine, since each of its operations is too short to split. So the default
uses every free core only for a network large enough to gain from them, on cores that are free.
"""
from __future__ import annotations

import os

# Parameters below which one thread is as fast as several (benchmarks/threads.py: the 100-100 MLPs of
# seq-digits and seq-mnist, 0.02M and 0.09M parameters, train fastest on one thread even idle).
SMALL_NETWORK_PARAMETERS = 1_000_000


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or container allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int, n_parameters: int) -> tuple[int, str]:
    """The thread count to use and the reason, as the run's log states it.

    `requested` > 0 is used as given; 0 chooses: one thread for a network under
    SMALL_NETWORK_PARAMETERS, otherwise the cores the machine's one-minute load average leaves
    free, at least one.
    """
    cores = usable_cores()
    if requested > 0:
        return requested, f"--num_threads {requested}"
    if n_parameters < SMALL_NETWORK_PARAMETERS:
        return 1, f"a network of {n_parameters / 1e6:.2f}M parameters trains fastest on one thread"
    load = os.getloadavg()[0]
    free = max(1, min(cores, int(cores - load + 0.5)))
    return free, f"{cores} usable cores with a load average of {load:.1f} leave {free} free"
