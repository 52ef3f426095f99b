"""The contract every registered component meets, tested for each one found in the registries.

No test here names a component: a new file in models/, plasticity/, buffer_policies/ or backbones/
is picked up and held to the same contract (test ids carry its registered name, so
`pytest -k NAME` runs one component's tests):

- a short run on seq-digits ends with finite accuracies, and every event reached every component:
  begin_task and end_task once per task, end_run once, after_backward and after_step at every step;
- a checkpoint written after the second task, resumed, ends bit for bit where the uninterrupted run
  ends (accuracy matrices, losses, and the whole state of the model, its buffer, policy and
  plasticity methods);
- a replay buffer never holds more than --buffer_size examples;
- `--help` for the component lists each of its flags;
- a value outside a range the component declares in BOUNDS is refused with one sentence (a dataset's too).
"""
from __future__ import annotations

import io
import math
import pickle
import shutil

import numpy as np
import pytest
import torch

import continual.run
import main
from backbones import BACKBONES
from buffer_policies import BUFFER_POLICIES
from continual.args import parse_args
from datasets import DATASETS
from models import MODELS
from plasticity import PLASTICITY
from utils.errors import ConfigError
from utils.mlflow_logger import RecordingLogger
from utils.registry import declared_flags, parse_interval

N_TRAIN = 1438  # seq-digits' training examples
BASE = ["--dataset", "seq-digits", "--lr", "0.05", "--seed", "0", "--device", "cpu", "--non_verbose", "--no_figures",
        "--n_epochs", "1"]
BUFFER = ["--buffer_size", "40"]
HOST = "er"  # the replay model that plasticity methods, buffer policies and backbones are tested under


def params(registry):
    return [pytest.param(cls, id=cls.NAME) for cls in registry.classes()]


@pytest.fixture(scope="module")
def score_file(tmp_path_factory):
    """Memorization scores for seq-digits' training set, all distinct, in an order unrelated to the rows."""
    path = tmp_path_factory.mktemp("scores") / "scores.npy"
    np.save(path, ((np.arange(N_TRAIN) * 7919) % N_TRAIN).astype(np.float32))
    return path


def model_flags(cls) -> list[str]:
    return ["--model", cls.NAME, *(BUFFER if cls.USES_BUFFER else [])]


class Recorder:
    """Runs main's `run` in-process, keeping the model it trained and a copy of each task's checkpoint."""

    def __init__(self, monkeypatch, tmp_path):
        self.models, self.checkpoints, self.tmp_path = [], {}, tmp_path
        train, save = continual.run.train, continual.run.save_checkpoint

        def recording_train(model, *args, **kwargs):
            self.models.append(model)
            return train(model, *args, **kwargs)

        def recording_save(path, payload):
            save(path, payload)
            copy = self.tmp_path / f"after_task_{payload['next_task']}_{len(self.models)}.pt"
            shutil.copyfile(path, copy)
            self.checkpoints[len(self.models), payload["next_task"]] = copy

        monkeypatch.setattr(continual.run, "train", recording_train)
        monkeypatch.setattr(continual.run, "save_checkpoint", recording_save)

    def run(self, argv: list[str]):
        args = parse_args([*argv, "--savecheck", "--checkpoint_dir", str(self.tmp_path / "ckpt")])
        return continual.run.run(args, logger=RecordingLogger(run_id=f"run{len(self.models)}"))


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Two checkpoint payloads are equal, tensors bit for bit (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_contract(recorder: Recorder, argv: list[str], n_tasks: int = 5, resume_after: int = 2) -> None:
    """Run uninterrupted, resume from the checkpoint after `resume_after` tasks, and check the contract."""
    state = recorder.run(argv)
    model = recorder.models[0]
    for setting, matrix in state.matrices.items():
        measured = matrix[np.tril_indices(n_tasks)]
        assert np.isfinite(measured).all() and ((0 <= measured) & (measured <= 100)).all(), setting

    counts, steps = model.lifecycle.counts, model.plasticity.step
    for label in ["model", *(label for label, _ in model.lifecycle.components())]:
        assert counts.get((label, "begin_task")) == n_tasks, label
        assert counts.get((label, "end_task")) == n_tasks, label
        assert counts.get((label, "end_run")) == 1, label
        assert counts.get((label, "after_step"), 0) == steps, label
        assert counts.get((label, "after_backward"), 0) == steps, label

    if model.buffer is not None:
        assert 0 < len(model.buffer) <= model.args.buffer_size
        for name in ("examples", "labels", "logits", "task_labels", "indices"):
            stored = getattr(model.buffer, name)
            assert stored is None or len(stored) == model.args.buffer_size, name

    resumed = recorder.run([*argv, "--resume", str(recorder.checkpoints[1, resume_after])])
    for setting in state.matrices:
        np.testing.assert_array_equal(resumed.matrices[setting], state.matrices[setting])
    np.testing.assert_array_equal(resumed.epoch_losses, state.epoch_losses)
    final, final_resumed = load(recorder.checkpoints[1, n_tasks]), load(recorder.checkpoints[2, n_tasks])
    for key in ("model", "rng", "matrices", "epoch_losses", "history"):
        assert_same(final[key], final_resumed[key], key)


# -- a run, its events, its buffer, and resuming -----------------------------------------------------------
@pytest.mark.parametrize("cls", params(MODELS))
def test_model_contract(cls, monkeypatch, tmp_path):
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, *model_flags(cls)])


@pytest.mark.parametrize("cls", params(PLASTICITY))
def test_plasticity_method_contract(cls, monkeypatch, tmp_path):
    # Three epochs: enough steps for the methods' maturity thresholds and schedules to act before the checkpoint.
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, "--n_epochs", "3", "--model", HOST, *BUFFER,
                                                     "--plasticity", cls.NAME, "--covariates"])


@pytest.mark.parametrize("cls", params(BUFFER_POLICIES))
def test_buffer_policy_contract(cls, monkeypatch, tmp_path, score_file):
    scores = ["--mem_scores", str(score_file)] if cls.NEEDS_MEMORIZATION_VALUES else []
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, "--model", HOST, *BUFFER, "--buffer_policy", cls.NAME,
                                                     *scores])


def small_cifar10(folder) -> None:
    """CIFAR-10's python release in its real format, 40 random 32×32 images per file (4 per class)."""
    rng = np.random.default_rng(0)
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                 "labels": np.repeat(np.arange(10), 4).tolist()}
        (folder / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("cls", params(BACKBONES))
def test_backbone_contract(cls, monkeypatch, tmp_path):
    # Two tasks of five classes: every backbone once through a task boundary and a resume, at the least cost,
    # on the 8×8 digits, or on small CIFAR-10 files for a backbone that refuses 8×8 images.
    data = ["--dataset", "seq-digits"]
    try:
        cls(parse_args([*BASE, "--model", HOST, "--backbone", cls.NAME]), (1, 8, 8), 10)
    except ConfigError:
        small_cifar10(tmp_path / "data")
        data = ["--dataset", "seq-cifar10", "--data_path", str(tmp_path / "data"), "--batch_size", "20"]
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, *data, "--n_tasks", "2", "--model", HOST, *BUFFER,
                                                     "--backbone", cls.NAME], n_tasks=2, resume_after=1)


# -- flags: shown by --help, ranges refused in one sentence --------------------------------------------------
def selection(kind: str, cls, scores=None) -> list[str]:
    """The flags that choose `cls` on main.py's command line (with the replay model HOST for a plasticity
    method, buffer policy or backbone, and the score file `scores` for a policy that needs one)."""
    if kind == "model":
        return model_flags(cls)
    host = ["--model", HOST, *BUFFER]
    if kind == "plasticity":
        return [*host, "--plasticity", cls.NAME]
    if kind == "policy":
        needs = ["--mem_scores", str(scores)] if scores is not None and cls.NEEDS_MEMORIZATION_VALUES else []
        return [*host, "--buffer_policy", cls.NAME, *needs]
    if kind == "dataset":
        return [*host, "--dataset", cls.NAME]
    return [*host, "--backbone", cls.NAME]


COMPONENTS = [pytest.param(kind, cls, id=f"{kind}-{cls.NAME}") for kind, registry in
              (("model", MODELS), ("plasticity", PLASTICITY), ("policy", BUFFER_POLICIES), ("backbone", BACKBONES))
              for cls in registry.classes()]


@pytest.mark.parametrize("kind, cls", COMPONENTS)
def test_help_lists_each_flag_of_the_component(kind, cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main([*selection(kind, cls), "--dataset", "seq-digits", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for options in declared_flags(cls).values():
        assert any(option in shown for option in options), options


def outside(interval: str, integer: bool) -> list[str]:
    """Values just outside an interval, on each finite side."""
    low, high, low_closed, high_closed = parse_interval(interval)
    step = 1 if integer else 0.5
    values = []
    if math.isfinite(low):
        values.append(low - step if low_closed else low)
    if math.isfinite(high):
        values.append(high + step if high_closed else high)
    return [str(int(v)) if integer else str(v) for v in values]


BOUNDED = [pytest.param(kind, cls, flag, interval, id=f"{kind}-{cls.NAME}-{flag}")
           for kind, registry in (("model", MODELS), ("plasticity", PLASTICITY), ("policy", BUFFER_POLICIES),
                                  ("backbone", BACKBONES), ("dataset", DATASETS))
           for cls in registry.classes() for flag, interval in getattr(cls, "BOUNDS", {}).items()]


@pytest.mark.parametrize("kind, cls, flag, interval", BOUNDED)
def test_a_value_outside_a_declared_range_is_refused_in_one_sentence(kind, cls, flag, interval, capsys, tmp_path,
                                                                     score_file):
    assert flag in declared_flags(cls), f"{cls.NAME} bounds --{flag}, which it does not declare"
    chosen = selection(kind, cls, score_file)
    integer = isinstance(parse_args([*BASE, *chosen]).__dict__[flag], int)
    for value in outside(interval, integer):
        code = main.main([*BASE, *chosen, f"--{flag}={value}",
                          "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"--{flag} must be in {interval}" in err


def test_component_flags_must_be_data():
    from continual.catalogue import _Recorder

    recorder = _Recorder("the model teacher")
    recorder.add_argument("--ema_decay", type=float, default=0.999, help="decay")
    with pytest.raises(ConfigError, match=r"the model teacher declares --ratio with type=<lambda>.*type=int, float or str"):
        recorder.add_argument("--ratio", type=lambda text: float(text) / 100)
    with pytest.raises(ConfigError, match="--when with default=<object"):
        recorder.add_argument("--when", default=object())


# -- what a component cannot break -------------------------------------------------------------------------
def test_a_copy_of_the_network_does_not_feed_the_hidden_unit_statistics():
    """A teacher or EMA copy made with deepcopy carries the network's forward hooks; they must not count."""
    import copy

    from tests.conftest import build_model

    model, dataset = build_model("--covariates")
    monitor = model.plasticity.units.monitor
    x = dataset.test_transform(dataset.train_split(0).images[:16])
    teacher = copy.deepcopy(model.net).train()
    teacher(x)
    assert all(float(s.sum()) == 0 for s in monitor.abs_sum) and all(p == 0 for p in monitor.positions)
    model.net.train()(x)
    assert all(p > 0 for p in monitor.positions)


def test_state_that_a_checkpoint_cannot_hold_ends_the_save_with_one_sentence():
    from tests.conftest import build_model
    from utils.state import StateError

    model, _ = build_model()
    model.handle = open(__file__)  # an attribute a checkpoint cannot hold
    try:
        with pytest.raises(StateError, match=r"sgd.handle holds a TextIOWrapper, which a checkpoint cannot save"):
            model.checkpoint_state()
    finally:
        model.handle.close()


def test_every_attribute_round_trips_through_a_checkpoint_file():
    """Tensors, arrays, numbers, containers, generators and a network made during the run come back."""
    from tests.conftest import build_model

    model, _ = build_model()
    model.counts = {"a": [1, 2.5, None], 3: (np.arange(4), torch.ones(2))}
    model.generator = torch.Generator().manual_seed(4)
    model.numpy_generator = np.random.default_rng(5)
    model.teacher = __import__("copy").deepcopy(model.net)
    with torch.no_grad():
        model.teacher.head.weight.add_(1)
    model.shared = [model.net.head.weight]  # a reference to a parameter stays a reference
    saved = io.BytesIO()
    torch.save(model.checkpoint_state(), saved)
    saved.seek(0)
    restored, _ = build_model("--seed", "1")
    restored.shared = []
    restored.load_checkpoint_state(torch.load(saved, weights_only=True))
    assert restored.counts["a"] == [1, 2.5, None] and np.array_equal(restored.counts[3][0], np.arange(4))
    assert torch.equal(restored.generator.get_state(), model.generator.get_state())
    assert restored.numpy_generator.random() == model.numpy_generator.random()
    assert torch.equal(restored.teacher.head.weight, model.teacher.head.weight)
    assert torch.equal(restored.net.head.weight, model.net.head.weight)
    assert restored.shared[0] is restored.net.head.weight


# -- a new component is one file ---------------------------------------------------------------------------
@pytest.mark.slow  # copies the checkout and runs pytest in it
def test_a_component_copied_under_a_new_name_is_held_to_the_contract_without_test_code(tmp_path):
    """Copying models/er.py, plasticity/l2.py and buffer_policies/reservoir.py under new registered names, with
    nothing else changed: the contract tests find the copies, and the tests that enumerate names still pass."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "mlruns", "mlflow.db*", "__pycache__", "data", "runs", "scores", "checkpoints"))
    for folder, name, decorator in (("models", "er", "register_model"), ("plasticity", "l2", "register_plasticity"),
                                    ("buffer_policies", "reservoir", "register_policy")):
        source = (checkout / folder / f"{name}.py").read_text()
        assert f'@{decorator}("{name}")' in source
        (checkout / folder / f"{name}_copy.py").write_text(
            source.replace(f'@{decorator}("{name}")', f'@{decorator}("{name}_copy")'))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          "tests/test_contracts.py", "tests/test_plasticity.py", "tests/test_main.py",
                          "-k", "er_copy or l2_copy or reservoir_copy or bad or unknown"],
                         cwd=checkout, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0 and "failed" not in summary, out.stdout[-3000:]
    collected = out.stdout
    for name in ("er_copy", "l2_copy", "reservoir_copy"):
        assert name in collected or int(summary.split()[0]) > 0
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_contracts.py", "-k", "er_copy or l2_copy or reservoir_copy"],
                         cwd=checkout, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}).stdout
    assert "test_model_contract[er_copy]" in ids
    assert "test_plasticity_method_contract[l2_copy]" in ids
    assert "test_buffer_policy_contract[reservoir_copy]" in ids
