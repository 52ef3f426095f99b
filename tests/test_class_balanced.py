"""class_balanced (CBRS) evens out class counts in the buffer while sampling each class uniformly."""
import argparse
import io

import numpy as np
import pytest
import torch

from buffer_policies import BUFFER_POLICIES
from buffer_policies import Buffer
from utils.lifecycle import Offered


def make_buffer(capacity: int, policy: str = "class_balanced") -> Buffer:
    return Buffer(capacity, "cpu", BUFFER_POLICIES.get(policy)(argparse.Namespace()))


def imbalanced_labels(counts: list[int], seed: int) -> torch.Tensor:
    """counts[c] examples of class c, interleaved at random."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels))


def feed(buffer: Buffer, labels: torch.Tensor, batch: int, start: int = 0, logits: bool = False) -> None:
    """Offer the stream in batches; every field of a row encodes its stream position."""
    for first in range(start, len(labels), batch):
        rows = torch.arange(first, min(first + batch, len(labels)))
        images = (rows % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
        buffer.add_data(images, labels[rows], indices=rows,
                        logits=rows.float()[:, None].expand(-1, 3).contiguous() if logits else None,
                        task_labels=rows // 32 if logits else None)


def class_counts(buffer: Buffer, n_classes: int) -> list[int]:
    return torch.bincount(buffer.labels[: len(buffer)], minlength=n_classes).tolist()


def assert_bookkeeping_matches(buffer: Buffer) -> None:
    state = buffer.policy.state_dict()
    assert torch.equal(state["slot_class"], buffer.labels[: len(buffer)])
    assert (state["seen"][: len(np.bincount(buffer.labels[: len(buffer)]))]
            >= torch.bincount(buffer.labels[: len(buffer)])).all()


def test_registered():
    assert "class_balanced" in BUFFER_POLICIES.names()


def test_imbalanced_stream_ends_balanced_while_reservoir_keeps_the_imbalance():
    torch.manual_seed(0)
    labels = imbalanced_labels([900, 90, 10], seed=0)
    balanced, reservoir = make_buffer(60), make_buffer(60, "reservoir")
    feed(balanced, labels, batch=16)
    feed(reservoir, labels, batch=16)
    counts = class_counts(balanced, 3)
    # Class 2 has fewer examples (10) than a fair share (20): it keeps all of them; 0 and 1 split the other 50.
    assert counts[2] == 10 and sum(counts) == 60
    assert abs(counts[0] - 25) <= 1 and abs(counts[1] - 25) <= 1 and abs(counts[0] - counts[1]) <= 1
    assert sorted(balanced.indices[labels[balanced.indices] == 2].tolist()) == torch.nonzero(labels == 2).flatten().tolist()
    assert_bookkeeping_matches(balanced)
    # Reservoir keeps the stream's 90% / 9% / 1% mix: about 54 / 5 / 1 (std ~2.3 for class 0).
    plain = class_counts(reservoir, 3)
    assert plain[0] >= 45 and plain[1] <= 12 and plain[2] <= 4


def test_each_example_of_a_class_is_kept_with_the_same_probability():
    torch.manual_seed(1)
    labels = imbalanced_labels([150, 40, 10], seed=1)  # buffer of 30: 10 per class at the end
    class0 = torch.nonzero(labels == 0).flatten().numpy()
    trials = 1500
    kept = np.zeros(len(labels))
    for _ in range(trials):
        buffer = make_buffer(30)
        feed(buffer, labels, batch=16)
        assert class_counts(buffer, 3) == [10, 10, 10]
        kept[buffer.indices.numpy()] += 1
    frequency = kept[class0] / trials
    p = 10 / 150
    std = np.sqrt(p * (1 - p) / trials)  # binomial std of one example's frequency: 0.0064
    assert np.abs(frequency - p).max() < 5 * std  # 5 std covers all 150 examples
    # No bias toward early or late examples: the two halves' means differ by < 5 std of that difference.
    half = len(frequency) // 2
    assert abs(frequency[:half].mean() - frequency[half:].mean()) < 5 * std * np.sqrt(2 / half)


def test_slots_fill_front_to_back_and_rows_stay_together():
    torch.manual_seed(2)
    buffer = make_buffer(16)
    labels = imbalanced_labels([120, 60, 20], seed=2)
    feed(buffer, labels[:5], batch=5)
    assert len(buffer) == 5 and buffer.indices[:5].tolist() == [0, 1, 2, 3, 4]
    for first in range(5, 200, 13):
        rows = torch.arange(first, min(first + 13, 200))
        slots, owners = buffer.policy.insert(buffer, Offered(labels[rows], labels[rows], None))
        assert len(set(slots.tolist())) == len(slots)  # unique slots
        assert slots.dtype == owners.dtype == torch.long and ((0 <= owners) & (owners < len(rows))).all()
        if buffer.n_seen < 16:  # filling: the next free slots, and none beyond them
            free = range(buffer.n_seen, min(16, buffer.n_seen + len(rows)))
            assert set(free) <= set(slots.tolist()) and slots.max() == free[-1]
        # Write what the policy chose, as Buffer.add_data does.
        buffer.labels[slots] = labels[rows][owners]
        buffer.indices[slots] = rows[owners]
        buffer.n_seen += len(rows)
    assert_bookkeeping_matches(buffer)
    assert len(set(buffer.indices.tolist())) == 16
    assert torch.equal(buffer.labels, labels[buffer.indices])

    full = make_buffer(16)
    feed(full, labels, batch=32, logits=True)
    batch = full.get_data(12)
    rows = batch["indices"]
    assert len(set(rows.tolist())) == 12
    assert torch.equal(batch["labels"], labels[rows])
    assert torch.equal(batch["examples"][:, 0, 0, 0].long(), rows % 256)
    assert torch.equal(batch["logits"][:, 0], rows.float())
    assert torch.equal(batch["task_labels"], rows // 32)


def test_a_batch_stores_what_one_by_one_insertion_would():
    """Rows of a batch that land on one slot: the later row wins, as with sequential insertion."""
    labels = imbalanced_labels([300, 100, 30, 5], seed=3)
    batched, single = make_buffer(8), make_buffer(8)
    torch.manual_seed(3)
    feed(batched, labels, batch=32)  # batches of 32 into 8 slots: many rows of one batch share a slot
    torch.manual_seed(3)
    feed(single, labels, batch=1)  # one uniform per row in both cases
    assert torch.equal(batched.indices, single.indices)
    assert torch.equal(batched.labels, labels[batched.indices])
    assert_bookkeeping_matches(batched)


def test_state_dict_round_trip_continues_exactly():
    labels = imbalanced_labels([400, 80, 20], seed=4)
    original = make_buffer(24)
    torch.manual_seed(4)
    feed(original, labels[:250], batch=16)
    saved = io.BytesIO()
    torch.save({"buffer": original.state_dict(), "policy": original.policy.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    restored = make_buffer(24)
    restored.load_state_dict(state["buffer"])
    restored.policy.load_state_dict(state["policy"])
    assert restored.policy.state_dict().keys() == original.policy.state_dict().keys()

    calls_a, calls_b = record_inserts(original), record_inserts(restored)
    torch.manual_seed(5)
    feed(original, labels, batch=16, start=250)
    torch.manual_seed(5)
    feed(restored, labels, batch=16, start=250)
    assert len(calls_a) == len(calls_b) == 16
    for (slots_a, rows_a), (slots_b, rows_b) in zip(calls_a, calls_b):
        assert torch.equal(slots_a, slots_b) and torch.equal(rows_a, rows_b)
    assert torch.equal(original.indices, restored.indices)
    # Same bookkeeping too, down to the order of each class's slot list (no re-read of the buffer happened).
    final_a, final_b = original.policy.state_dict(), restored.policy.state_dict()
    for key, value in final_a.items():
        assert torch.equal(value, final_b[key]) if isinstance(value, torch.Tensor) else value == final_b[key]
    assert_bookkeeping_matches(restored)


def record_inserts(buffer: Buffer) -> list:
    calls, insert = [], buffer.policy.insert

    def recording(target, offered):
        calls.append(insert(target, offered))
        return calls[-1]

    buffer.policy.insert = recording
    return calls


def test_fresh_policy_state_is_loadable():
    state = make_buffer(10).policy.state_dict()
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    policy = BUFFER_POLICIES.get("class_balanced")(argparse.Namespace())
    policy.load_state_dict(torch.load(saved, weights_only=True))
    buffer = Buffer(10, "cpu", policy)
    feed(buffer, imbalanced_labels([10, 5], seed=5), batch=4)
    assert class_counts(buffer, 2) == [5, 5]


def test_buffer_rewritten_outside_the_policy_is_reread():
    """A rebuild that rewrites slots directly (e.g. the memorization policies) must not desynchronise counts."""
    torch.manual_seed(7)
    labels = imbalanced_labels([200, 50], seed=7)
    buffer = make_buffer(20)
    feed(buffer, labels, batch=16)
    # Rewrite the buffer: class 1 only, and only 12 slots (as a rebuild that shrinks it would).
    ones = torch.nonzero(labels == 1).flatten()[:12]
    buffer.labels[:12], buffer.indices[:12] = 1, ones
    buffer.n_seen = 12
    feed(buffer, torch.cat([labels, torch.zeros(100, dtype=torch.long)]), batch=16, start=len(labels))
    assert_bookkeeping_matches(buffer)
    assert class_counts(buffer, 2) == [10, 10]


def test_negative_labels_are_refused():
    buffer = make_buffer(4)
    with pytest.raises(ValueError, match="non-negative"):
        feed(buffer, torch.tensor([0, -1]), batch=2)
