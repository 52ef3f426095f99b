"""Timing and report helpers shared by the benchmark scripts.

The common start of their command lines (`benchmark_parser`), the machine line a report opens with
and the load line it closes with, and clocks that wait for the device's queued work (`timed`,
`median_seconds`), so a CUDA kernel still running is not left out of a measurement.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from benchmarks.engine_throughput import load_average, machine, synchronize


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, showing its defaults, with --device (CUDA if any)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def describe_device(device: str, *notes: str) -> str:
    """The device as given, followed on CUDA by the GPU's name and `notes` in parentheses."""
    if torch.device(device).type != "cuda":
        return device
    return f"{device} ({', '.join([torch.cuda.get_device_name(device), *notes])})"


def machine_line(device: str, *details: str) -> str:
    """The line a report opens with: machine, torch, threads, `device` (described), `details`, load average."""
    return "; ".join([f"machine: {machine()}", f"torch {torch.__version__}",
                      f"{torch.get_num_threads()} intra-op threads", f"device {device}", *details,
                      f"load average {load_average()}"])


def end_load_line() -> str:
    """The load line a report's table follows, after an empty line."""
    return f"\nload average (1, 5, 15 min) at the end: {load_average()}"


def timed(work: Callable[[], object], device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of `clock` that one call of `work` takes, the device's queued work finished before and after."""
    synchronize(device)
    start = clock()
    work()
    synchronize(device)
    return clock() - start


def median_seconds(work: Callable[[], object], device: str, samples: int, clock: Callable[[], float],
                   warmup: int = 20) -> float:
    """Median time of one call of `work` over `samples` calls, after `warmup` more that are not counted."""
    seconds = [timed(work, device, clock) for _ in range(warmup + samples)]
    return statistics.median(seconds[warmup:])


def spread(values: list[float]) -> list[float]:
    """Smallest, the three quartiles, largest."""
    return [min(values), *statistics.quantiles(values, n=4), max(values)]
