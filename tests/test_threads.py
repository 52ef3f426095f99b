"""--num_threads: the default is one thread for a training step of little arithmetic and the free cores otherwise."""
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
    assert threads.choose_threads(3, 50e9) == (3, "--num_threads 3")


def test_a_step_of_little_arithmetic_gets_one_thread_even_on_an_idle_machine(machine):
    assert threads.choose_threads(0, 5.4e6) == (1, "a training step of 5.4 MFLOPs runs fastest on one thread")


@pytest.mark.parametrize("load, expected", [(0.0, 8), (0.3, 8), (2.6, 5), (7.4, 1), (7.6, 1), (30.0, 1)])
def test_a_large_network_gets_the_cores_the_load_leaves_free(machine, load, expected):
    machine["value"] = load
    chosen, reason = threads.choose_threads(0, 3.3e9)
    assert chosen == expected
    assert reason == f"a training step of 3.30 GFLOPs; 8 usable cores with a load average of {load:.1f} leave {expected} free"


def test_the_work_of_a_step_is_counted_from_the_network_not_its_parameters():
    """A Linear layer's forward is 2·in·out FLOPs per example; a step is three forwards' worth per example.
    A small ViT has fewer parameters than an MLP but far more work per step, and gets the cores."""
    import argparse

    import torch

    from backbones import BACKBONES

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 100, bias=False))
    assert threads.step_flops(linear, (1, 8, 8), 32) == 3 * 2 * 64 * 100 * 32
    assert linear.training  # the mode is restored

    def backbone(name, **flags):
        parser = argparse.ArgumentParser()
        BACKBONES.get(name).add_args(parser)
        return BACKBONES.get(name)(argparse.Namespace(**{**vars(parser.parse_args([])), **flags}), (3, 32, 32), 10)
    vit = backbone("vit", vit_depth=3, vit_width=48, vit_heads=3, vit_patch=4, vit_mlp_ratio=4)
    mlp = backbone("mlp", mlp_hidden="50")
    assert sum(p.numel() for p in vit.parameters()) < sum(p.numel() for p in mlp.parameters())
    assert threads.step_flops(vit, (3, 32, 32), 100) > threads.SMALL_STEP_FLOPS > threads.step_flops(mlp, (3, 32, 32), 10)


def test_usable_cores_follow_the_process_affinity():
    import os

    assert threads.usable_cores() == len(os.sched_getaffinity(0))


def test_a_negative_thread_count_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match=r"--num_threads must be in \[0, inf\), got -2"):
        parse_args(["--model", "sgd", "--lr", "0.1", "--num_threads", "-2"])
