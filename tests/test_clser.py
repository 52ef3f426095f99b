"""CLS-ER on seq-digits: the memories' EMA updates, evaluation with the stable memory, the consistency target
and loss, and a short run through main's `run`."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

import continual.run
from continual.args import parse_args
from tests.conftest import build_model, train_steps
from utils.mlflow_logger import RecordingLogger

ALWAYS = ("--plastic_model_update_freq", "1", "--stable_model_update_freq", "1",
          "--plastic_model_alpha", "0.9", "--stable_model_alpha", "0.3")


def clser(*flags: str):
    return build_model("--dataset", "seq-digits", "--buffer_size", "200", *flags, model="clser")


def states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in module.state_dict().items()}
            for name, module in (("net", model.net), ("plastic", model.plastic_model.module),
                                 ("stable", model.stable_model.module))}


def test_each_memory_moves_by_its_decay_after_a_step():
    model, dataset = clser(*ALWAYS)
    train_steps(model, dataset, 3)
    before = states(model)
    steps_before = model.plasticity.step
    assert steps_before == 3
    train_steps(model, dataset, 1)
    after = states(model)
    # The fourth step of the run: decay min(1 - 1/(4 + 1), alpha), i.e. 0.8 capped by each memory's alpha.
    for memory, alpha in (("plastic", 0.9), ("stable", 0.3)):
        decay = min(1 - 1 / (steps_before + 1 + 1), alpha)
        assert decay == {"plastic": 0.8, "stable": 0.3}[memory]
        for key, old in before[memory].items():
            new = after["net"][key]
            assert not torch.equal(after[memory][key], old), key
            assert torch.equal(after[memory][key], torch.lerp(old, new, 1 - decay)), key
            torch.testing.assert_close(after[memory][key], decay * old + (1 - decay) * new, rtol=0, atol=1e-6)


def test_the_first_update_averages_the_initial_and_the_stepped_network_equally():
    model, dataset = clser(*ALWAYS)
    initial = copy.deepcopy(model.net.state_dict())
    train_steps(model, dataset, 1)
    for key, value in model.net.state_dict().items():  # decay min(1 - 1/2, alpha): 0.5 for the plastic memory
        assert torch.equal(model.plastic_model.module.state_dict()[key], torch.lerp(initial[key], value, 0.5))
        assert torch.equal(model.stable_model.module.state_dict()[key], torch.lerp(initial[key], value, 0.7))


def test_memories_never_change_with_update_frequency_zero():
    model, dataset = clser("--plastic_model_update_freq", "0", "--stable_model_update_freq", "0")
    initial = states(model)
    for key, value in initial["net"].items():
        assert torch.equal(initial["plastic"][key], value) and torch.equal(initial["stable"][key], value)
    train_steps(model, dataset, 12)
    final = states(model)
    assert any(not torch.equal(final["net"][k], v) for k, v in initial["net"].items())
    for memory in ("plastic", "stable"):
        for key, value in initial[memory].items():
            assert torch.equal(final[memory][key], value), (memory, key)


def test_updates_are_drawn_from_torch_global_generator():
    """The same global seed gives the same memories; another seed skips other updates."""
    flags = ("--plastic_model_update_freq", "0.5", "--stable_model_update_freq", "0.5")
    results = []
    for seed in (0, 0, 1):
        model, dataset = clser(*flags)
        torch.manual_seed(seed)
        train_steps(model, dataset, 10)
        results.append(states(model))
    def same(a, b):
        return all(torch.equal(a[m][k], b[m][k]) for m in ("plastic", "stable") for k in a[m])

    assert same(results[0], results[1]) and not same(results[0], results[2])


def test_evaluation_uses_the_stable_memory():
    model, dataset = clser(*ALWAYS)
    train_steps(model, dataset, 5)
    x = dataset.test_transform(dataset.test_split(0).images[:64])
    with torch.no_grad():
        model.eval()
        evaluated = model(x)
        stable, plastic, working = model.stable_model.module(x), model.plastic_model.module(x), model.net(x)
        assert torch.equal(evaluated, stable)
        assert not torch.allclose(evaluated, working) and not torch.allclose(evaluated, plastic)
        model.train()
        assert torch.equal(model(x), model.net(x))


def hand_target(stable: torch.Tensor, plastic: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = []
    for s, p, y in zip(stable, plastic, labels.tolist()):
        rows.append(s if torch.softmax(s, 0)[y] > torch.softmax(p, 0)[y] else p)
    return torch.stack(rows)


def test_the_consistency_target_is_the_memory_surer_of_the_true_class():
    model, dataset = clser(*ALWAYS)
    train_steps(model, dataset, 6)
    x = dataset.test_transform(dataset.train_split(0).images[:16])
    with torch.no_grad():
        stable, plastic = model.stable_model.module(x), model.plastic_model.module(x)
    p_stable, p_plastic = stable.softmax(1), plastic.softmax(1)
    # Labels chosen so that the stable memory wins on even rows and the plastic one on odd rows: both
    # distributions sum to 1, so where they differ each is the surer one on some class.
    gap = p_stable - p_plastic
    labels = torch.where(torch.arange(16) % 2 == 0, gap.argmax(1), gap.argmin(1))
    target = model.consistency_target(x, labels)
    assert torch.equal(target, hand_target(stable, plastic, labels))
    assert torch.equal(target[0::2], stable[0::2]) and torch.equal(target[1::2], plastic[1::2])
    # With the labels the stream gives, too.
    real = dataset.train_split(0).labels[:16]
    assert torch.equal(model.consistency_target(x, real), hand_target(stable, plastic, real))


def test_the_loss_is_replay_cross_entropy_plus_weighted_consistency():
    model, dataset = clser(*ALWAYS, "--reg_weight", "0.7")
    train_steps(model, dataset, 4)
    split = dataset.train_split(0)
    raw, labels, indices = split.images[200:232], split.labels[200:232], split.indices[200:232]
    inputs = dataset.test_transform(raw)
    state = torch.get_rng_state()
    replay = model.buffer.get_data(model.args.minibatch_size, transform=model.transform)
    torch.set_rng_state(state)  # observe draws the same replay batch
    loss = model.observe(inputs, labels, raw, indices, 0)
    with torch.no_grad():
        target = hand_target(model.stable_model.module(replay["examples"]),
                             model.plastic_model.module(replay["examples"]), replay["labels"])
        expected = (0.7 * F.mse_loss(model.net(replay["examples"]), target)
                    + F.cross_entropy(model.net(torch.cat((inputs, replay["examples"]))),
                                      torch.cat((labels, replay["labels"]))))
    torch.testing.assert_close(loss.detach(), expected)


def test_a_short_run_through_main_ends_above_chance():
    args = parse_args(["--model", "clser", "--dataset", "seq-digits", "--buffer_size", "200", "--lr", "0.1",
                       "--n_epochs", "1", "--seed", "0", "--device", "cpu", "--non_verbose"])
    state = continual.run.run(args, logger=RecordingLogger(run_id="clser"))
    final = state.matrices["class_il"][-1]
    assert np.isfinite(final).all()
    assert final.mean() > 100 / 10  # ten classes
