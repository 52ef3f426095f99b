"""What each replay model stores and learns from, checked on the real digits data."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from backbones import BACKBONES
from datasets import DATASETS
from models import MODELS
from continual.args import CONFIG_DIR, parse_args


def build(model_name: str, *extra: str):
    args = parse_args(["--model", model_name, "--lr", "0.1", "--seed", "0", "--device", "cpu", *extra])
    torch.manual_seed(args.seed)
    dataset = DATASETS.get(args.dataset)(args)
    backbone = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return MODELS.get(model_name)(backbone, dataset, args), dataset


def stream_task(model, dataset, task: int, batch_size: int = 32) -> None:
    split = dataset.train_split(task)
    for start in range(0, len(split), batch_size):
        raw = split.images[start:start + batch_size]
        loss = model.lifecycle.observe(dataset.train_transform(raw), split.labels[start:start + batch_size], raw,
                             split.indices[start:start + batch_size], task)
        model.lifecycle.step(loss)


@pytest.mark.parametrize("name", ["er", "der", "derpp"])
def test_buffer_rows_are_the_dataset_rows_they_claim_to_be(name):
    model, dataset = build(name, "--buffer_size", "50")
    for task in range(2):
        stream_task(model, dataset, task)
    stored = model.buffer.get_all()
    indices = stored["indices"]
    assert len(indices) == 50 and len(set(indices.tolist())) == 50
    assert stored["examples"].dtype == torch.uint8
    assert torch.equal(stored["examples"], dataset.train.images[indices])
    assert torch.equal(stored["labels"], dataset.train.labels[indices])
    assert set(stored["labels"].tolist()) <= {0, 1, 2, 3}  # only the two seen tasks
    assert torch.equal(stored["task_labels"], stored["labels"] // 2)


def test_der_stores_the_logits_computed_before_the_step():
    model, dataset = build("der", "--buffer_size", "100")
    split = dataset.train_split(0)
    raw, labels = split.images[:32], split.labels[:32]
    inputs = dataset.train_transform(raw)
    before = copy.deepcopy(model.net)
    model.lifecycle.step(model.lifecycle.observe(inputs, labels, raw, split.indices[:32], 0))
    with torch.no_grad():
        expected = before(inputs)
    assert torch.allclose(model.buffer.logits[:32], expected)
    # The step changed the network, so the stored logits are the old ones, not the new ones.
    assert not torch.allclose(model.net(inputs), expected)


def test_joint_trains_on_every_seen_task():
    model, dataset = build("joint")
    data = model.training_data(2)
    assert sorted(set(data.labels.tolist())) == [0, 1, 2, 3, 4, 5]
    assert len(data) == sum(len(dataset.train_split(t)) for t in range(3))


def test_every_published_configuration_parses_for_its_dataset_and_model():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        table = yaml.safe_load(path.read_text())
        assert table["source"], f"{path.name} must cite its source"
        for model, entries in table.items():
            if model == "source":
                continue
            for buffer, values in entries.items():
                buffer_args = [] if buffer == "any" else ["--buffer_size", str(buffer)]
                args = parse_args(["--dataset", path.stem, "--model", model, *buffer_args,
                                   "--model_config", "best"])
                for key, value in values.items():
                    assert getattr(args, key) == value, (path.name, model, buffer, key)
