"""Policies deciding which examples a replay buffer keeps, registered by CLI name (`reservoir`, ...)."""
from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

import torch

from utils.registry import Registry

if TYPE_CHECKING:
    from utils.buffer import Buffer


class BufferPolicy:
    """Chooses the buffer slots that incoming stream examples overwrite.

    `insert` returns (slots, rows): buffer slot slots[k] receives batch row rows[k]; slots are
    unique. Slots fill front to back (0, 1, 2, ...) until the buffer is full.
    """

    NAME: str

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Policy-specific flags (none by default)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def state_dict(self) -> dict:
        """Bookkeeping a checkpoint must restore (plain ints, lists, tensors); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def insert(self, buffer: "Buffer", labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for an incoming batch with these labels (the buffer's fields are readable, not yet updated)."""
        raise NotImplementedError


BUFFER_POLICIES: Registry[BufferPolicy] = Registry("buffer policy", "buffer_policies", plural="buffer policies")
register_policy = BUFFER_POLICIES.register
