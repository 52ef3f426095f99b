"""gss: the gradient score by hand, how the buffer fills and is replaced, --batch_num, and Mammoth's numbers.

MAMMOTH_* were computed by Mammoth's own models/gss.py and utils/gss_buffer.py (work tree at commit
e75a491, torch 2.14 on CPU, one thread), printed by `/work/mammoth-venv/bin/python
benchmarks/mammoth_parity_gem_gss.py reference`: the MLP 784-100-100-10 from fixed weights on
seq-mnist with 8 training examples a task, buffer 8, batch 4, replay minibatch 3, scored subset 4,
--batch_num 2, 3 tasks of 3, 3, 2 steps, lr 0.1, torch and numpy seeded with 0 before the first step.
Both sides draw the same random numbers in the same order (module docstring of models/gss.py), so the
slots Mammoth's buffer ends with are pinned as the dataset rows they hold: rows 14, 33, 21 and 4 replaced
four of the first task's examples.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.mammoth_parity_gem_gss import run_ours
from continual.args import parse_args
from models.gss import FIRST_BATCH_SCORE, gradient_score
from tests.conftest import build_model
from utils.errors import ConfigError

MAMMOTH_LOSSES = [1.223922610282898, 2.5300819873809814, 1.7617155313491821, 7.67362642288208, 1.676966667175293,
                  1.751944899559021, 2.105640172958374, 1.748930811882019]
MAMMOTH_WEIGHTS = {  # name: [sum, sum of squares, first entry] after the 8 batches (16 steps)
    "layers.0.weight": [-350.4237782780858, 181.74998597657117, -0.08267910778522491],
    "layers.0.bias": [-0.8937819707061863, 0.01907162971238597, -0.005370541475713253],
    "layers.1.weight": [-43.758704993946594, 97.28741981902066, -0.15598879754543304],
    "layers.1.bias": [-1.3777748813154176, 0.03407042165862502, -0.02332419715821743],
    "head.weight": [0.19151158563545323, 20.46668667001675, -0.16200245916843414],
    "head.bias": [1.862645149230957e-08, 0.018148718981496934, 0.05090799927711487],
}
MAMMOTH_BUFFER_ROWS = [0, 1, 10, 11, 14, 33, 21, 4]
MAMMOTH_SCORES = [0.10000000149011612, 0.10000000149011612, 0.10000000149011612, 0.10000000149011612,
                  0.9195970296859741, 0.5840191841125488, 1.5974698066711426, 1.0102148056030273]


def test_gss_steps_and_buffer_equal_mammoths(tmp_path):
    ours = run_ours("gss", tmp_path)
    assert ours["losses"] == pytest.approx(MAMMOTH_LOSSES, rel=1e-5)
    for name, expected in MAMMOTH_WEIGHTS.items():
        assert ours["weights"][name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert ours["buffer_indices"] == MAMMOTH_BUFFER_ROWS
    assert ours["scores"] == pytest.approx(MAMMOTH_SCORES, rel=1e-5)


def offer(model, dataset, task: int, rows) -> None:
    split = dataset.train_split(task)
    rows = torch.as_tensor(rows)
    model.buffer.add_data(split.images[rows], split.labels[rows], indices=split.indices[rows],
                          task_labels=torch.full((len(rows),), task))


def hand_gradient(model, images, labels) -> torch.Tensor:
    """The cross-entropy's gradient over every parameter, the network in evaluation mode, one backward pass."""
    model.net.eval()
    loss = F.cross_entropy(model.net(model.dataset.test_transform(images)), labels)
    grads = torch.autograd.grad(loss, list(model.net.parameters()))
    model.net.train()
    return torch.cat([d.reshape(-1) for d in grads])


def test_score_is_one_plus_the_largest_cosine_to_the_stored_examples_gradients():
    model, dataset = build_model("--buffer_size", "6", "--gss_minibatch_size", "4", model="gss")
    split = dataset.train_split(0)
    images, labels = split.images[:10], split.labels[:10]
    stored = [hand_gradient(model, images[i:i + 1], labels[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(model.example_gradients(images[:4], labels[:4]), torch.stack(stored),
                               rtol=1e-5, atol=1e-7)
    batch = hand_gradient(model, images[4:10], labels[4:10])
    torch.testing.assert_close(model.batch_gradient(images[4:10], labels[4:10]), batch)
    cosines = [float(torch.dot(batch, s) / (batch.norm() * s.norm())) for s in stored]
    assert gradient_score(batch, torch.stack(stored)) == pytest.approx(1 + max(cosines), rel=1e-6)
    assert gradient_score(stored[0], torch.stack(stored)) == pytest.approx(2.0, rel=1e-6)  # itself among them
    assert gradient_score(-stored[0], stored[0][None]) == pytest.approx(0.0, abs=1e-6)


def test_filling_takes_free_slots_in_order_with_the_batchs_score_then_replaces_by_the_rule():
    model, dataset = build_model("--buffer_size", "6", "--gss_minibatch_size", "4", model="gss")
    policy = model.buffer.policy
    first, second = dataset.train_split(0), dataset.train_split(1)
    np.random.seed(3)
    offer(model, dataset, 0, [0, 1, 2, 3])  # empty buffer: the fixed first score
    assert model.buffer.indices[:4].tolist() == first.indices[:4].tolist()
    np.testing.assert_array_equal(policy.scores[:4], np.float32(FIRST_BATCH_SCORE))

    # Two free slots, then a full buffer: the third row is decided by the rule. Its draws, replayed by hand:
    # the scored subset, then a slot drawn in proportion to the scores and a uniform number.
    state = np.random.get_state()
    subset = np.random.choice(4, size=4, replace=False)
    stored_grads = torch.stack([hand_gradient(model, model.buffer.examples[i:i + 1], model.buffer.labels[i:i + 1])
                                for i in subset])
    batch = hand_gradient(model, second.images[:3], second.labels[:3])
    c = 1 + max(float(F.cosine_similarity(batch, g, dim=0)) for g in stored_grads)
    own = hand_gradient(model, second.images[2:3], second.labels[2:3])
    c_own = 1 + max(float(F.cosine_similarity(own, g, dim=0)) for g in stored_grads)
    assert c < 1  # new classes: the batch's gradient points away from every stored one's
    scores = np.array([FIRST_BATCH_SCORE] * 4 + [c, c], dtype=np.float32)
    slot = np.random.choice(np.arange(6), size=1, p=scores / scores.sum())[0]
    replaced = np.random.rand(1)[0] < scores[slot] / (scores[slot] + c_own)
    np.random.set_state(state)
    offer(model, dataset, 1, [0, 1, 2])
    assert model.buffer.n_seen == 7
    expected = first.indices[:4].tolist() + second.indices[:2].tolist()  # slots 4, 5 entered with the score c
    if replaced:
        scores[slot], expected[slot] = c_own, int(second.indices[2])
    np.testing.assert_allclose(policy.scores, scores, rtol=1e-5)
    assert model.buffer.indices.tolist() == expected

    # A full buffer and a batch whose gradient agrees with a stored one's (c ≥ 1): nothing is replaced.
    before, scores = model.buffer.indices.clone(), policy.scores.copy()
    offer(model, dataset, 0, [0, 1])
    assert torch.equal(model.buffer.indices, before) and np.array_equal(policy.scores, scores)
    assert model.buffer.n_seen == 9


def test_batch_num_takes_that_many_steps_on_the_batch_and_offers_it_once():
    model, dataset = build_model("--buffer_size", "20", "--batch_num", "3", "--minibatch_size", "4", model="gss")
    split = dataset.train_split(0)
    for step in range(2):
        rows = torch.arange(8 * step, 8 * step + 8)
        raw = split.images[rows]
        before = model.plasticity.step
        loss = model.lifecycle.observe(dataset.test_transform(raw), split.labels[rows], raw, split.indices[rows], 0)
        assert model.plasticity.step == before + 2 and len(model.buffer) == 8 * step  # not yet offered
        model.lifecycle.step(loss)
        assert model.plasticity.step == before + 3 and len(model.buffer) == 8 * (step + 1)
    assert model.lifecycle.counts["model", "after_step"] == 6
    assert model.buffer.indices[:16].tolist() == split.indices[:16].tolist()


def test_scores_are_saved_with_the_buffer():
    model, dataset = build_model("--buffer_size", "6", model="gss")
    np.random.seed(0)
    offer(model, dataset, 0, range(4))
    offer(model, dataset, 1, range(4))
    state = model.checkpoint_state()
    fresh, _ = build_model("--buffer_size", "6", model="gss")
    fresh.load_checkpoint_state(state)
    np.testing.assert_array_equal(fresh.buffer.policy.scores, model.buffer.policy.scores)
    assert fresh.buffer.policy.model is fresh and fresh.buffer.policy.scores.any()


@pytest.mark.parametrize("flags, sentence", [
    (["--buffer_policy", "min"], "gss chooses its buffer's contents by gradient diversity; drop --buffer_policy min"),
    (["--gss_minibatch_size", "0"], "--gss_minibatch_size must be at least 1, got 0"),
    (["--batch_num", "0"], "--batch_num must be in [1, inf) (declared by the model gss), got 0"),
])
def test_impossible_values_are_refused_in_one_sentence(flags, sentence, tmp_path):
    scores = tmp_path / "scores.npy"
    np.save(scores, np.zeros(1438, dtype=np.float32))
    with pytest.raises(ConfigError) as error:
        parse_args(["--model", "gss", "--buffer_size", "10", "--lr", "0.1", "--device", "cpu", "--mem_scores",
                    str(scores), *flags])
    assert sentence in str(error.value) and "\n" not in str(error.value)
