"""--num_threads: the default is one thread for small networks and the free cores for large ones."""
from __future__ import annotations

import pytest

from continual.args import parse_args
from utils import threads
from utils.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """A machine of 8 usable cores whose one-minute load average the test sets."""
    load = {"value": 0.0}
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load["value"], 0.0, 0.0))
    return load


def test_a_requested_count_is_used_as_given(machine):
    machine["value"] = 20.0
    assert threads.choose_threads(3, 50_000_000) == (3, "--num_threads 3")


def test_a_small_network_gets_one_thread_even_on_an_idle_machine(machine):
    assert threads.choose_threads(0, 89_610) == (1, "a network of 0.09M parameters trains fastest on one thread")


@pytest.mark.parametrize("load, expected", [(0.0, 8), (0.3, 8), (2.6, 5), (7.4, 1), (7.6, 1), (30.0, 1)])
def test_a_large_network_gets_the_cores_the_load_leaves_free(machine, load, expected):
    machine["value"] = load
    chosen, reason = threads.choose_threads(0, 11_000_000)
    assert chosen == expected
    assert reason == f"8 usable cores with a load average of {load:.1f} leave {expected} free"


def test_usable_cores_follow_the_process_affinity():
    import os

    assert threads.usable_cores() == len(os.sched_getaffinity(0))


def test_a_negative_thread_count_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match=r"--num_threads cannot be negative, got -2 \(0 chooses\)"):
        parse_args(["--model", "sgd", "--lr", "0.1", "--num_threads", "-2"])
