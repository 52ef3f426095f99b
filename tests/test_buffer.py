"""The replay buffer keeps a uniform sample of the stream, in uint8, with every field of a row together."""
import argparse

import numpy as np
import pytest
import torch

from buffer_policies import BUFFER_POLICIES, Buffer
from utils.errors import ConfigError


def reservoir_buffer(capacity: int) -> Buffer:
    return Buffer(capacity, "cpu", BUFFER_POLICIES.get("reservoir")(argparse.Namespace()))


def stream(n: int):
    """n tiny uint8 images whose pixels, label and dataset index all encode the row number."""
    rows = torch.arange(n)
    images = (rows % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, rows % 10, rows


def test_first_examples_fill_slots_in_order_until_full():
    buffer = reservoir_buffer(8)
    images, labels, indices = stream(5)
    buffer.add_data(images, labels, indices=indices)
    assert len(buffer) == 5 and buffer.n_seen == 5
    assert buffer.indices[:5].tolist() == [0, 1, 2, 3, 4]
    assert buffer.examples.dtype == torch.uint8


@pytest.mark.slow  # thousands of seeded streams
def test_every_stream_example_is_kept_with_probability_capacity_over_n():
    torch.manual_seed(0)
    capacity, n, batch, trials = 10, 100, 7, 3000
    kept = np.zeros(n)
    for _ in range(trials):
        buffer = reservoir_buffer(capacity)
        images, labels, indices = stream(n)
        for start in range(0, n, batch):
            buffer.add_data(images[start:start + batch], labels[start:start + batch],
                            indices=indices[start:start + batch])
        stored = buffer.indices.tolist()
        assert len(set(stored)) == capacity  # no example stored twice
        kept[stored] += 1
    frequency = kept / trials
    # Binomial(3000, 0.1) has std 0.0055; 5 std covers all 100 examples.
    assert np.abs(frequency - capacity / n).max() < 0.03
    # Early and late examples are equally likely: no bias toward the start or end of the stream.
    assert abs(frequency[:50].mean() - frequency[50:].mean()) < 0.01


def test_rows_stay_together_and_sampling_is_without_replacement():
    torch.manual_seed(1)
    buffer = reservoir_buffer(16)
    images, labels, indices = stream(200)
    logits = indices.float()[:, None].expand(200, 3).contiguous()
    for start in range(0, 200, 32):
        sl = slice(start, start + 32)
        buffer.add_data(images[sl], labels[sl], logits=logits[sl], indices=indices[sl],
                        task_labels=torch.full((len(indices[sl]),), start // 32))
    batch = buffer.get_data(12)
    rows = batch["indices"]
    assert len(set(rows.tolist())) == 12
    assert torch.equal(batch["labels"], rows % 10)
    assert torch.equal(batch["examples"][:, 0, 0, 0].long(), rows % 256)
    assert torch.equal(batch["logits"][:, 0], rows.float())
    assert torch.equal(batch["task_labels"], rows // 32)
    assert len(buffer.get_data(100)["indices"]) == 16  # never more than stored


def test_state_dict_round_trip_restores_contents_and_counter():
    torch.manual_seed(2)
    buffer = reservoir_buffer(6)
    images, labels, indices = stream(20)
    buffer.add_data(images, labels, indices=indices)
    restored = reservoir_buffer(6)
    restored.load_state_dict(buffer.state_dict())
    assert restored.n_seen == 20
    assert torch.equal(restored.indices, buffer.indices)
    assert torch.equal(restored.examples, buffer.examples)


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ConfigError, match="known buffer policies: .*reservoir"):
        BUFFER_POLICIES.get("fifo")


def test_a_reselecting_policy_rewrites_the_buffer_through_write_rows_and_keep_first():
    buffer = reservoir_buffer(6)
    images, labels, indices = stream(6)
    logits = torch.arange(12, dtype=torch.float32).view(6, 2)
    buffer.add_data(images, labels, logits=logits, indices=indices)
    candidates = {"examples": images.flip(0), "labels": labels.flip(0), "logits": logits.flip(0),
                  "indices": indices.flip(0)}  # rows 0..5 hold dataset indices 5..0
    end = buffer.write_rows(1, candidates, np.array([0, 2]))  # dataset indices 5 and 3 into slots 1, 2
    assert end == 3
    assert buffer.indices.tolist() == [0, 5, 3, 3, 4, 5]
    assert buffer.logits[1].tolist() == [10.0, 11.0] and buffer.examples[2].flatten().tolist() == [3] * 4
    buffer.keep_first(end)
    assert len(buffer) == 3 and buffer.get_all()["indices"].tolist() == [0, 5, 3]
    new_images, new_labels, new_indices = stream(8)
    buffer.add_data(new_images[7:], new_labels[7:], indices=new_indices[7:])  # the next free slot is 3
    assert buffer.indices[3].item() == 7 and len(buffer) == 4
