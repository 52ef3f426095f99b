"""gem: the QP projection against scipy's solutions, the memory, the step in the task loop, and Mammoth's numbers.

MAMMOTH_* were computed by Mammoth's own models/gem.py (work tree at commit e75a491, torch 2.14 on CPU,
one thread), printed by `/work/mammoth-venv/bin/python benchmarks/mammoth_parity_gem_gss.py reference`:
the MLP 784-100-100-10 from fixed weights, seq-mnist with 4 training examples a task, a memory of
20 // 5 = 4 a task (so it is each finished task's whole training set and Mammoth's class-balanced
`fill_buffer` is replaced by one storing exactly that), 3 tasks of 3 steps of batch 4, lr 0.03, γ 0.5.
5 of the 6 steps after the first task solve the QP, the last three with two constraints.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from benchmarks.mammoth_parity_gem_gss import run_ours
from continual.args import parse_args
from models.gem import DIAGONAL_EPS, project
from tests.conftest import build_model, train_steps
from utils.errors import ConfigError

MAMMOTH_LOSSES = [2.3117642402648926, 1.8489902019500732, 1.3739650249481201, 2.8798298835754395, 2.1687614917755127,
                  1.8844780921936035, 2.789769172668457, 2.3350515365600586, 2.000931739807129]
MAMMOTH_WEIGHTS = {  # name: [sum, sum of squares, first entry] after the 9 steps
    "layers.0.weight": [25.829350818789408, 177.82279396622596, -0.08245187997817993],
    "layers.0.bias": [0.06692597571418446, 0.0007857392998036198, -0.0011763242073357105],
    "layers.1.weight": [0.3459903411567211, 100.29074938390283, -0.152772918343544],
    "layers.1.bias": [0.04870256571302889, 0.0037670142441273966, -0.003914198838174343],
    "head.weight": [0.19151048266212456, 18.31264395158631, -0.17603546380996704],
    "head.bias": [3.259629011154175e-09, 0.003255166993483211, -0.005043331999331713],
}
MAMMOTH_PROJECTIONS = 5


def test_gem_steps_equal_mammoths(tmp_path):
    ours = run_ours("gem", tmp_path)
    assert ours["projections"] == MAMMOTH_PROJECTIONS
    assert ours["losses"] == pytest.approx(MAMMOTH_LOSSES, rel=1e-5)
    for name, expected in MAMMOTH_WEIGHTS.items():
        assert ours["weights"][name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def conflicting_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """g [12] and three memory gradients M [3, 12]: g points against the first two, agrees with the third."""
    generator = torch.Generator().manual_seed(seed)
    memories = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    g = -1.5 * memories[0] - 0.5 * memories[1] + 0.3 * torch.randn(12, generator=generator, dtype=torch.float64)
    g = g + (2.0 - memories[2] @ g / memories[2].norm() ** 2) * memories[2]  # g·g_3 > 0
    assert (memories[:2] @ g < 0).all() and memories[2] @ g > 0
    return g, memories


def nearest_meeting_constraints(target: np.ndarray, memories: np.ndarray) -> np.ndarray:
    """scipy: argmin ‖z − target‖² subject to memories @ z ≥ 0 (the paper's primal problem)."""
    result = scipy.optimize.minimize(lambda z: 0.5 * np.sum((z - target) ** 2), target, jac=lambda z: z - target,
                                     constraints=[{"type": "ineq", "fun": lambda z: memories @ z,
                                                   "jac": lambda z: memories}],
                                     method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert result.success
    return result.x


def test_projection_with_no_margin_is_the_nearest_gradient_that_raises_no_memory_loss():
    g, memories = conflicting_problem()
    projected = project(g, memories, margin=0.0, eps=1e-10)
    assert projected.dtype == torch.float64
    assert (memories @ projected >= -1e-8).all()  # every constraint met
    expected = nearest_meeting_constraints(g.numpy(), memories.numpy())
    np.testing.assert_allclose(projected.numpy(), expected, atol=1e-6)
    # the first two constraints are active (the projection lies on their boundary), the third is not
    np.testing.assert_allclose((memories[:2] @ projected).numpy(), 0.0, atol=1e-7)
    assert memories[2] @ projected > 0.1


def test_margin_projects_g_plus_gamma_times_the_memories_sum():
    """v ≥ γ in the dual: the result is the nearest vector to g + γ Σ_k g_k meeting every constraint."""
    g, memories = conflicting_problem(seed=1)
    projected = project(g, memories, margin=0.5, eps=1e-10)
    expected = nearest_meeting_constraints((g + 0.5 * memories.sum(0)).numpy(), memories.numpy())
    np.testing.assert_allclose(projected.numpy(), expected, atol=1e-6)
    assert (memories @ projected >= -1e-8).all()


def test_projection_with_mammoths_eps_solves_the_dual_qp():
    """The default ε = 1e-3 on the diagonal: the dual QP solved by scipy (L-BFGS-B, v ≥ γ), then g̃ = Mᵀv + g."""
    g, memories = conflicting_problem(seed=2)
    m, gv = memories.numpy(), g.numpy()
    gram = m @ m.T + DIAGONAL_EPS * np.eye(3)
    linear = m @ gv
    result = scipy.optimize.minimize(lambda v: 0.5 * v @ gram @ v + linear @ v, np.ones(3), jac=lambda v: gram @ v + linear,
                                     bounds=[(0.5, None)] * 3, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    np.testing.assert_allclose(project(g, memories, margin=0.5).numpy(), m.T @ result.x + gv, atol=1e-6)
    float32 = project(g.float(), memories.float(), margin=0.5)
    assert float32.dtype == torch.float32
    np.testing.assert_allclose(float32.numpy(), m.T @ result.x + gv, rtol=1e-5, atol=1e-5)


def test_memory_holds_an_equal_share_of_each_finished_task():
    model, dataset = build_model("--buffer_size", "50", model="gem")
    for task in range(2):
        train_steps(model, dataset, 2, task=task)
        model.lifecycle.end_task(task)
    stored = model.buffer.get_all()
    assert torch.equal(stored["task_labels"], torch.tensor([0] * 10 + [1] * 10))
    assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
    assert torch.equal(stored["labels"] // 2, stored["task_labels"])


def test_the_step_follows_the_projection_against_each_tasks_memory_gradient():
    model, dataset = build_model("--buffer_size", "50", "--lr", "0.1", model="gem")
    for task in range(2):
        train_steps(model, dataset, 6, task=task)
        model.lifecycle.end_task(task)
    params = list(model.net.parameters())
    split = dataset.train_split(2)
    projected = kept = 0
    for step in range(6):
        rows = torch.arange(step * 32, step * 32 + 32)
        inputs, labels = dataset.test_transform(split.images[rows]), split.labels[rows]
        loss = model.observe(inputs, labels, split.images[rows], split.indices[rows], 2)
        model.opt.zero_grad(set_to_none=True)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        torch.manual_seed(step)
        model.after_backward(2)
        edited = torch.cat([p.grad.reshape(-1) for p in params])
        torch.manual_seed(step)  # the memory's augmentation draws again, then each task's gradient by hand
        memory = model.buffer.get_all()
        examples = dataset.train_transform(memory["examples"])
        by_hand = []
        for t in (0, 1):
            mine = memory["task_labels"] == t
            loss_t = F.cross_entropy(model.net(examples[mine]), memory["labels"][mine])
            by_hand.append(torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss_t, params)]))
        memories = torch.stack(by_hand)
        if (memories @ g < 0).any():
            projected += 1
            torch.testing.assert_close(edited, project(g, memories, 0.5))
            # g̃ = g + Mᵀv with v ≥ γ: the memories' losses fall to first order, up to ε v on the diagonal
            assert (memories @ edited > -1e-2 * memories.norm(dim=1) * edited.norm()).all()
        else:
            kept += 1
            assert torch.equal(edited, g)
        model.opt.step()
    assert projected > 0


@pytest.mark.parametrize("flags, sentence", [
    (["--buffer_size", "3"], "gem keeps --buffer_size // n_tasks examples of each task"),
    (["--buffer_size", "10", "--gamma", "-1"], "--gamma must be in [0, inf) (declared by the model gem), got -1.0"),
])
def test_impossible_values_are_refused_in_one_sentence(flags, sentence):
    with pytest.raises(ConfigError) as error:
        parse_args(["--model", "gem", "--lr", "0.1", "--device", "cpu", *flags])
    assert sentence in str(error.value) and "\n" not in str(error.value)
