"""One continual-learning run: dataset, backbone, model → tasks → evaluation → MLflow, resumable."""
from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from backbones import BACKBONES, FLAGS_ADDED
from buffer_policies import BUFFER_POLICIES
from continual.args import computational_config
from continual.forgetting import StreamRecorder, log_forgetting
from continual.reproduce import Console, configuration, continue_command
from continual.records import RunRecords, summary_table
from continual.training import RunState, train
from datasets import DATASETS
from memorization.plan import fingerprint
from memorization.score_format import load_scores, score_source_tags
from models import MODELS
from plasticity import PLASTICITY, method_names
from utils.checkpoint import (
    check_consistent,
    check_same_config,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from utils.errors import ConfigError, RunFailed, TrainingDiverged, current_command, failure_sentence
from utils.mlflow_logger import (
    RecordingLogger,
    RunLogger,
    check_reachable,
    default_tracking_uri,
    environment_tags,
    run_exists,
)
from utils.registry import declared_flags
from utils.state import StateError
from utils.threads import choose_threads, step_flops


def fail_run(logger, error: Exception, state: RunState, checkpoint_path: Path | None, console: Console) -> RunFailed:
    """Close the run FAILED with the error as a tag and its traceback as an artifact (where the store can still
    take them), and say in one sentence what happened and how to continue."""
    import traceback

    sentence = failure_sentence(error)
    kept = "its traceback is logged with the run (error/traceback.txt)"
    try:
        logger.set_tags({"error": sentence})
        logger.log_text(traceback.format_exc(), "error/traceback.txt")
    except Exception:  # noqa: BLE001  the store itself may be what failed (a full disk)
        kept = "the store could not take its traceback"
    try:
        close_run(logger, "FAILED", console)
    except Exception:  # noqa: BLE001
        kept += "; the run could not be marked FAILED (a later run on this machine marks it KILLED)"
    done = f"{state.next_task} task{'s' if state.next_task != 1 else ''} finished and logged"
    resume = (f"; continue with --resume {checkpoint_path}" if checkpoint_path is not None and checkpoint_path.exists()
              else "")
    return RunFailed(f"{sentence}; the MLflow run is marked FAILED with {done}, and {kept}{resume}")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(args: argparse.Namespace, data_seed: int | None = None, keep: np.ndarray | None = None):
    """A run's dataset, backbone and model, after seeding every generator with --seed. A learner of a stream plan
    (memorization/stream.py) builds its own the same way, with the plan's seed for the data (label noise and class
    order are the plan's, the same for every learner) and `keep`, the training examples it trains on."""
    set_seed(args.seed)
    dataset = DATASETS.get(args.dataset)(args if data_seed is None else argparse.Namespace(**{**vars(args),
                                                                                                "seed": data_seed}))
    if keep is not None:
        dataset.keep_training_examples(keep)
    if args.mem_scores:
        dataset.mem_scores = load_scores(args.mem_scores, dataset)
    backbone = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES).to(args.device)
    return dataset, backbone, MODELS.get(args.model)(backbone, dataset, args)


def run_name(args: argparse.Namespace) -> str:
    """What a run is, readable in the MLflow run list: er-seq-digits-buf200-redo-s5."""
    parts = [args.model, args.dataset]
    if MODELS.get(args.model).USES_BUFFER:
        parts.append(f"buf{args.buffer_size}" + ("" if args.buffer_policy == "reservoir" else f"-{args.buffer_policy}"))
    parts += method_names(args.plasticity)
    return "-".join(parts + [f"s{args.seed}"])


def logged_params(args: argparse.Namespace) -> dict:
    """The arguments, without the flags of components the run does not use (every plasticity method's
    and buffer policy's flags are parsed so that --help and checks can name them)."""
    chosen = set(method_names(args.plasticity))
    unused = set()
    for method in PLASTICITY.classes():
        if method.NAME not in chosen:
            unused |= set(declared_flags(method))
    for method in chosen:
        unused -= set(declared_flags(PLASTICITY.get(method)))
    if not MODELS.get(args.model).USES_BUFFER:
        unused |= set(declared_flags(BUFFER_POLICIES.get(args.buffer_policy))) | {"buffer_policy", "minibatch_size"}
    return {k: v for k, v in vars(args).items() if k not in unused}


def log_new_run(logger: RunLogger, args: argparse.Namespace, dataset) -> None:
    """The run's parameters (the task count as the dataset resolved it), its environment, dataset, command line,
    and `config.yaml`: its resolved flags, which `main.py --config config.yaml` runs again."""
    params = logged_params(args)
    logger.log_params({**params, "n_tasks": dataset.n_tasks})
    logger.set_tags(environment_tags(args.device))
    if isinstance(logger, RunLogger) and current_command() is not None:
        logger.set_tags({"command_line": current_command()})
    if args.mem_scores:  # the score file's digest, and the eval_splits.py run that computed it
        logger.set_tags(score_source_tags(args.mem_scores))
    logger.log_dataset(dataset.NAME, fingerprint(dataset.class_order[dataset.train.labels.cpu().numpy()]),
                       dataset.source(args.data_path))
    derived = {"class_order": dataset.class_order.tolist(), "n_tasks": dataset.n_tasks,
               "classes_per_task": dataset.classes_per_task, "n_train": len(dataset.train),
               "n_test": len(dataset.test), "n_relabeled": int(dataset.noisy_mask.sum())}
    logger.log_text(configuration(params, dataset.n_tasks), "config.yaml")
    logger.log_text(yaml.safe_dump(derived, sort_keys=True), "derived.yaml")
    if dataset.noisy_mask.any():
        logger.log_array(dataset.noisy_mask, "noisy_mask.npy")  # which training examples were relabeled


def run(args: argparse.Namespace, logger: RunLogger | RecordingLogger | None = None) -> RunState:
    """Train and evaluate every task, logging to MLflow (or, from a sweep's worker, into `logger`)."""
    with Console() as console:
        return _locked(args, logger, console)


def _locked(args: argparse.Namespace, logger, console: Console) -> RunState:
    """`_run`, holding the lock of the checkpoint it resumes (if any)."""
    if not args.resume:
        return _run(args, logger, None, console)
    checkpoint = load_checkpoint(args.resume)  # a file that is no checkpoint is refused before anything is written
    # One process at a time continues a checkpoint: two would log every point twice.
    from filelock import FileLock, Timeout

    lock = FileLock(f"{args.resume}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"checkpoint {args.resume} is being resumed by another process; wait for it to end "
                          f"(or stop it) before resuming it again") from None
    try:
        return _run(args, logger, checkpoint, console)
    finally:
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)  # no lock file left beside the checkpoint


def _run(args: argparse.Namespace, logger: RunLogger | RecordingLogger | None, checkpoint: dict | None,
         console: Console) -> RunState:
    """`run` itself, with the checkpoint (if any) read and locked."""
    if checkpoint is not None:
        if args.seed is None:
            args.seed = checkpoint["config"]["seed"]
        check_same_config(args.resume, checkpoint["config"], computational_config(args), FLAGS_ADDED)
    elif args.seed is None:
        args.seed = secrets.randbelow(2**31 - 1)
    if logger is None:
        args.tracking_uri = args.tracking_uri or default_tracking_uri()
        check_reachable(args.tracking_uri)  # before any work, so a dead server costs nothing

    dataset, backbone, model = build(args)
    args.num_threads, threads_reason = choose_threads(args.num_threads, 0.0 if args.num_threads else step_flops(
        backbone, dataset.SHAPE, args.batch_size, args.device))
    torch.set_num_threads(args.num_threads)
    print(f"{args.num_threads} CPU thread{'s' if args.num_threads > 1 else ''}: {threads_reason}", flush=True)
    state = RunState.fresh(dataset)
    if checkpoint is not None:
        check_consistent(args.resume, checkpoint, state.matrices, args.n_epochs)
        try:
            model.load_checkpoint_state(checkpoint["model"])
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            raise ConfigError(f"checkpoint {args.resume} is inconsistent (its model state does not fit this model: "
                              f"{type(error).__name__} {str(error)[:120]}); resume from another checkpoint or start "
                              f"the run again without --resume") from None
        state = RunState({k: v.numpy() for k, v in checkpoint["matrices"].items()}, checkpoint["next_task"],
                         list(checkpoint["epoch_losses"]), {k: list(v) for k, v in checkpoint["history"].items()})
        set_rng_state(checkpoint["rng"])
    if args.forgetting_events:
        state.forgetting = StreamRecorder(len(dataset.train), args.device)
        if checkpoint is not None:
            if "forgetting" not in checkpoint:
                raise ConfigError(f"checkpoint {args.resume} was written without --forgetting_events, so the "
                                  f"forgetting events of its finished tasks are unknown; resume without the flag")
            state.forgetting.load_state_dict(checkpoint["forgetting"])

    linked = None  # a resumed run whose MLflow run this store does not hold continues in a new run linked to it
    if logger is None:
        run_id = checkpoint["mlflow_run_id"] if checkpoint is not None else None
        if run_id is not None and not run_exists(args.tracking_uri, run_id):
            linked, run_id = run_id, None
        logger = RunLogger(args.tracking_uri, args.experiment_name, args.run_name or run_name(args), run_id=run_id)
    elif checkpoint is not None:
        logger.load_state_dict(checkpoint["logger"])
    if checkpoint is None or linked is not None:
        log_new_run(logger, args, dataset)
    if linked is not None:
        logger.set_tags({"resumed_from_run": linked, "resumed_from_store": checkpoint["tracking_uri"],
                         "resumed_after_task": checkpoint["next_task"]})
        print(f"the checkpoint's MLflow run {linked} is not in {args.tracking_uri}; the run continues as a new run "
              f"tagged resumed_from_run, from task {checkpoint['next_task'] + 1}", flush=True)
    logger.set_tags({"threads": f"{args.num_threads}: {threads_reason}"})
    # A checkpoint follows every task, so that a stopped run can continue; without --savecheck it is a
    # recovery file, removed when the run finishes (and a failure to write it only warns).
    kept = bool(args.savecheck) or bool(checkpoint is not None and checkpoint.get("kept", True))
    checkpoint_path = Path(args.resume) if args.resume else Path(args.checkpoint_dir) / f"{logger.run_id}.pt"
    if kept:
        logger.set_tags({"checkpoint": str(checkpoint_path.resolve())})
    warned = []

    def save(state: RunState) -> None:
        try:
            save_checkpoint(checkpoint_path, {
                "config": computational_config(args), "tracking_uri": args.tracking_uri,
                "mlflow_run_id": logger.run_id, "logger": logger.state_dict(), "next_task": state.next_task,
                "epoch_losses": state.epoch_losses, "history": state.history,
                "matrices": {k: torch.from_numpy(v) for k, v in state.matrices.items()},
                "model": model.checkpoint_state(), "rng": rng_state(), "kept": kept,
                **({"forgetting": state.forgetting.state_dict()} if state.forgetting is not None else {}),
            })
        except OSError as error:
            if kept:
                raise
            if not warned:
                print(f"warning: the recovery checkpoint {checkpoint_path} cannot be written ({error.strerror or error}); "
                      f"a stopped run will start again from its first task", file=sys.stderr, flush=True)
                warned.append(error)
            return
        if args.savecheck == "task":
            task_copy = checkpoint_path.with_name(f"{checkpoint_path.stem}_task{state.next_task}.pt")
            task_copy.unlink(missing_ok=True)
            os.link(checkpoint_path, task_copy)  # the same bytes, kept when the next task replaces the checkpoint
        if kept:
            print(f"checkpoint after task {state.next_task}: {checkpoint_path}", flush=True)

    if isinstance(logger, RunLogger):
        print(f"MLflow run {logger.run_id} in {args.tracking_uri}", flush=True)
    try:
        train(model, dataset, args, RunRecords(logger, figures=args.figures), state, after_task=save)
    except (TrainingDiverged, ConfigError) as error:
        logger.set_tags({"error": str(error)})
        close_run(logger, "FAILED", console)
        raise
    except KeyboardInterrupt as stop:
        close_run(logger, "KILLED", console)
        if isinstance(logger, RunLogger):
            stop.continue_with = (f"continue with:\n  {continue_command(str(checkpoint_path))}"
                                  if checkpoint_path.exists() else
                                  "no task had finished, so there is no checkpoint; the same command starts again")
        raise
    except Exception as error:  # noqa: BLE001  a full disk, memory, a bug: the run is closed FAILED, not left RUNNING
        raise fail_run(logger, error, state, checkpoint_path, console) from None
    print(summary_table(state, args))
    if state.forgetting is not None:
        log_forgetting(logger, state.forgetting, dataset, args, step=state.next_task)
        print("forgetting events: artifact forgetting/events.npy (and its events.json) of the run; download both "
              "and pass the .npy to --mem_scores", flush=True)
    if not kept:
        checkpoint_path.unlink(missing_ok=True)
    close_run(logger, "FINISHED", console)
    if isinstance(logger, RunLogger):
        print("\n" + logger.where_to_look(), flush=True)
    return state


def close_run(logger, status: str, console: Console) -> None:
    """End the run with `status`, its console output logged as `console.txt` first (where the store takes it)."""
    try:
        logger.log_text(console.text, "console.txt")
    finally:
        logger.finish(status)
