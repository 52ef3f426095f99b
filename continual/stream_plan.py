"""Stream plans: memorization measured inside the continual stream (`train_splits.py --plan_kind stream`).

Each of K learners runs main.py's continual run of a registered method (`--cl_model` with main.py's flags: any
model, buffer policy and plasticity method, through continual/run.py's `build` and continual/training.py's
`train`) on a random subset of every task's training data, and after every task its predictions on every training
and test example are recorded. The subsets are balanced within each task: every example of a task is in the same
number of learners' subsets (±1), so the held-out estimator has learners with and without each example at every
task boundary (memorization/stream_eval.py). The plan and the learners' files live in a subset-training store
(memorization/store.py), so a stream plan resumes and is shared between drivers like any plan.

A learner trains alone (K processes on a launcher, not one vectorised ensemble): the continual methods keep
per-learner buffers and take data-dependent branches, so the learners do not share one batched program.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
import torch

from continual.stream_args import continual_config, learner_args
from memorization.plan import Plan, fingerprint, stratified_masks
from memorization.store import SubsetStore
from memorization.stream_eval import example_tasks
from utils.errors import ConfigError

PREDICTION_BATCH = 1024


def make_stream_plan(args: argparse.Namespace) -> Plan:
    """The stream plan of the arguments: per-task balanced subsets, learner seeds, the continual configuration."""
    from datasets import DATASETS

    learner = learner_args(args.continual_argv, seed=args.seed, device="cpu", data_path=args.data_path)
    dataset = DATASETS.get(learner.dataset)(learner)  # as main.py builds it with the plan's seed; no model needed
    tasks = example_tasks(dataset)
    labels = dataset.train.labels.cpu().numpy()
    rng = np.random.default_rng([args.seed, 5])
    masks = stratified_masks(tasks, args.ratios[0], args.n_models, rng)
    n = len(labels)
    settings = {
        "kind": "stream", "dataset": learner.dataset, "classes": None, "n_train": n, "n_train_total": n,
        "n_test": len(dataset.test), "n_tasks": dataset.n_tasks, "label_fingerprint": fingerprint(labels),
        "seed": args.seed, "label_noise": learner.label_noise, "input_noise": 0.0, "backbone": learner.backbone,
        "subset_ratios": args.ratios, "n_models_per_ratio": args.n_models, "mask_sampling": "balanced within tasks",
        "continual": args.continual, "continual_argv": args.continual_argv,
        "training": {"n_epochs": learner.n_epochs, "lr": learner.lr, "batch_size": learner.batch_size},
    }
    if args.cpu_threads != 1:
        settings["grouping"] = {"size": 1, "cpu_threads": args.cpu_threads}
    model_seed = np.random.default_rng([args.seed, 6]).integers(0, 2**31 - 1, args.n_models)
    return Plan(settings, masks, np.full(args.n_models, args.ratios[0]), model_seed, np.arange(n, dtype=np.int64),
                dataset.noisy_mask, np.zeros(n, dtype=bool))


@torch.no_grad()
def predictions(model, dataset, task: int, split) -> dict[str, np.ndarray]:
    """The model's softmax probability of each example's label over the classes seen after `task`, and whether its
    class-IL prediction (argmax over them) is right, as the run's evaluation predicts; NaN and False for the
    examples of classes not yet seen."""
    was_training = model.training
    model.eval()
    n_seen = dataset.seen_classes(task)
    probs, correct = [], []
    for start in range(0, len(split), PREDICTION_BATCH):
        logits = model(dataset.test_transform(split.images[start:start + PREDICTION_BATCH]))[:, :n_seen].float()
        labels = split.labels[start:start + PREDICTION_BATCH]
        seen = labels < n_seen
        p = logits.softmax(1).gather(1, labels.clamp(max=n_seen - 1)[:, None])[:, 0]
        probs.append(torch.where(seen, p, torch.full_like(p, float("nan"))))
        correct.append((logits.argmax(1) == labels) & seen)
    model.train(was_training)
    return {"prob": torch.cat(probs).cpu().numpy().astype(np.float16),
            "correct": torch.cat(correct).cpu().numpy()}


def train_learner(plan: Plan, model_id: int, data_path: str, device: str, on_task=None) -> dict[str, np.ndarray]:
    """Run learner `model_id`'s continual run and return its predictions after every task ([T, n] train, [T, m]
    test) with its class-IL accuracy matrix. `on_task(t)` follows task t (progress)."""
    from continual.forgetting import StreamRecorder
    from continual.records import RunRecords
    from continual.training import RunState, train
    from continual.run import build
    from utils.mlflow_logger import RecordingLogger

    settings = plan.settings
    args = learner_args(settings["continual_argv"], seed=int(plan.model_seed[model_id]), device=device,
                        data_path=data_path)
    resolved = continual_config(args)
    if resolved != settings["continual"]:
        changed = sorted(k for k in set(settings["continual"]) | set(resolved)
                         if settings["continual"].get(k) != resolved.get(k))
        raise ConfigError(f"main.py resolves this stream plan's flags differently now ({', '.join(changed)}); its "
                          f"learners would not be the plan's: train the plan again into a new --out")
    keep = np.zeros(settings["n_train"], dtype=bool)
    keep[plan.train_indices] = plan.inclusion_mask[model_id]
    with contextlib.redirect_stdout(io.StringIO()):  # a learner's console lines are its driver's noise
        dataset, _, model = build(args, data_seed=settings["seed"], keep=keep)
        if fingerprint(dataset.train.labels.cpu().numpy()) != settings["label_fingerprint"]:
            raise ConfigError(f"the {settings['dataset']} training labels under {data_path} differ from those the "
                              f"plan was made for (fingerprint); point --data_path at the same files")
        recorded = {f"{key}_{part}": [] for key in ("prob", "correct") for part in ("train", "test")}
        state = RunState.fresh(dataset)
        # forgetting events of the learner's stream examples (main.py --forgetting_events: it changes no result),
        # the single continual run's proxy that eval_splits.py --proxies scores
        state.forgetting = StreamRecorder(len(dataset.train), args.device)
        setting = next(iter(state.matrices))

        def after_task(state: RunState) -> None:
            task = state.next_task - 1
            for part, split in (("train", dataset.train), ("test", dataset.test)):
                for key, value in predictions(model, dataset, task, split).items():
                    recorded[f"{key}_{part}"].append(value)
            if on_task is not None:
                on_task(task + 1)

        train(model, dataset, args, RunRecords(RecordingLogger(f"learner-{model_id}"), figures=False), state,
              after_task)
    counts = state.forgetting.events.arrays()
    return {"epochs": np.arange(1, dataset.n_tasks + 1, dtype=np.int64),
            "forget_events_train": counts["events"][0], "never_learned_train": counts["never_learned"][0],
            **{key: np.stack(values) for key, values in recorded.items()},
            "accuracy": state.matrices[setting].astype(np.float32)}


_PLANS: dict[tuple[str, str | None], Plan] = {}  # a worker process reads a store's plan once


def train_and_store_learners(store_dir: str, model_ids: list[int], data_path: str, device: str) -> dict:
    """A launcher's unit of work for a stream plan: run these learners and write their files; timing for the
    driver."""
    store = SubsetStore(store_dir)
    key = (str(store_dir), store.plan_hash())  # a store's plan may be replaced meanwhile
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = store.load_plan()
    plan = _PLANS[key]
    if torch.device(device).type == "cpu":  # the plan's thread count: conv results depend on it
        torch.set_num_threads(plan.settings.get("grouping", {}).get("cpu_threads", 1))
    started = time.perf_counter()
    for model_id in model_ids:
        arrays = train_learner(plan, model_id, data_path, device,
                               on_task=lambda done: store.write_progress(model_ids[0], done))
        store.write_model(model_id, plan.hash, **arrays)
    seconds = time.perf_counter() - started
    store.write_timing(model_ids, seconds)
    store.clear_progress(model_ids[0])
    return {"model_ids": model_ids, "seconds": seconds}
