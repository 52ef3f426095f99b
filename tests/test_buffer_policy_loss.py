"""The loss policy keeps the offered examples of highest (or lowest) loss at insertion, computed by the network."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from buffer_policies import BUFFER_POLICIES, Buffer

LOSSES = torch.tensor([3.0, 1.0, 4.0, 1.5, 9.0, 2.0, 6.0, 5.0])  # the loss of dataset row i


def scorer(examples: torch.Tensor) -> torch.Tensor:
    """Logits whose cross-entropy with label 0 is LOSSES[row], the row stored in the example's single pixel."""
    loss = LOSSES[examples.flatten().long()]
    return torch.stack([torch.zeros_like(loss), torch.log(torch.expm1(loss))], 1)


def offer(buffer: Buffer, rows: list[int]) -> None:
    rows = torch.tensor(rows)
    buffer.add_data(rows.to(torch.uint8)[:, None], torch.zeros(len(rows), dtype=torch.long), indices=rows)


@pytest.mark.parametrize("keep, after", [
    ("high", [[0, 1, 2], {0, 2, 3, 4, 5}, {0, 2, 4, 6, 7}]),  # {3,4,9,2,1.5}, then {9,6,5,4,3}
    ("low", [[0, 1, 2], {0, 1, 2, 3, 5}, {0, 1, 2, 3, 5}]),  # {3,1,4,1.5,2}, then 6 and 5 are not kept
])
def test_the_buffer_keeps_the_extreme_losses_among_stored_and_offered(keep, after):
    policy = BUFFER_POLICIES.get("loss")(argparse.Namespace(loss_keep=keep))
    buffer = Buffer(5, "cpu", policy, scorer=scorer)
    offer(buffer, [0, 1, 2])
    assert buffer.indices[:len(buffer)].tolist() == after[0]  # empty slots fill front to back
    offer(buffer, [3, 4, 5])
    assert set(buffer.indices[:len(buffer)].tolist()) == after[1] and len(buffer) == 5
    offer(buffer, [6, 7])
    assert set(buffer.indices.tolist()) == after[2]
    # each slot's score is the loss its example had when it was stored, and the image is the example's own
    torch.testing.assert_close(policy.scores, LOSSES[buffer.indices])
    assert torch.equal(buffer.examples.flatten().long(), buffer.indices)


def test_offered_loss_is_the_networks_cross_entropy_at_insertion():
    net = torch.nn.Linear(4, 3)
    seen = []
    buffer = Buffer(2, "cpu", BUFFER_POLICIES.get("loss")(argparse.Namespace(loss_keep="high")),
                    scorer=lambda x: seen.append(x) or net(x.float()))
    x, y = torch.randint(0, 255, (3, 4), dtype=torch.uint8), torch.tensor([0, 2, 1])
    buffer.add_data(x, y, indices=torch.arange(3))
    expected = F.cross_entropy(net(x.float()), y, reduction="none").detach()
    assert torch.equal(seen[0], x)  # the unaugmented examples offered
    assert set(buffer.indices.tolist()) == set(torch.topk(expected, 2).indices.tolist())
