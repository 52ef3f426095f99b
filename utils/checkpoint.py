"""End-of-task checkpoints: written atomically, read with weights_only=True, checked against the run's config."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError

FORMAT_VERSION = 4  # 3: the model's whole state (utils/state.py); 4: metric names in sections, tasks from 1


def rng_state() -> dict:
    """All generators training draws from (torch on CPU and every GPU; numpy and random for safety)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT_VERSION, **payload}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such checkpoint file; pass the path printed by --savecheck")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise ConfigError(f"--resume {path} cannot be read (permission denied); fix its permissions") from None
    except Exception as error:  # noqa: BLE001  any failure to read it means it is not a usable checkpoint
        raise ConfigError(f"--resume {path} is corrupt or not a checkpoint of this framework "
                          f"({type(error).__name__}); resume from another checkpoint or start the run again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--resume {path} is not a checkpoint of this framework (format "
                          f"{payload.get('format') if isinstance(payload, dict) else '?'}); start the run again")
    return payload


def check_same_config(path: str | Path, saved: dict, current: dict, added: dict | None = None) -> None:
    """Refuse to continue a run whose results-determining arguments differ from the checkpoint's. `added` maps flags
    added after the checkpoint may have been written to the value it ran with: a flag of the current run that the
    checkpoint lacks is read at that value."""
    saved = {**{k: v for k, v in (added or {}).items() if k in current}, **saved}
    keys = sorted(set(saved) | set(current))
    differences = [f"--{k} {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                   for k in keys if saved.get(k) != current.get(k)]
    if differences:
        raise ConfigError(f"checkpoint {path} belongs to another configuration ({'; '.join(differences)}); "
                          f"resume with the checkpoint's arguments or start a new run without --resume")


def check_consistent(path: str | Path, checkpoint: dict, matrices: dict, n_epochs: int) -> None:
    """Refuse a well-formed checkpoint whose fields do not fit together or this run (an edited or mixed-up file):
    `matrices` are a fresh run's accuracy matrices, which the saved ones must match in names and shapes."""
    def refuse(what: str):
        raise ConfigError(f"checkpoint {path} is inconsistent ({what}); resume from another checkpoint or start the "
                          f"run again without --resume")

    missing = [k for k in ("config", "tracking_uri", "mlflow_run_id", "logger", "next_task", "epoch_losses",
                           "history", "matrices", "model", "rng") if k not in checkpoint]
    if missing:
        refuse(f"it lacks {', '.join(missing)}")
    n_tasks = len(next(iter(matrices.values())))
    next_task = checkpoint["next_task"]
    if not isinstance(next_task, int) or isinstance(next_task, bool) or not 1 <= next_task <= n_tasks:
        refuse(f"next_task {next_task!r} is not a task count between 1 and {n_tasks}")
    saved = checkpoint["matrices"]
    if not isinstance(saved, dict) or set(saved) != set(matrices) or any(
            not isinstance(saved[k], torch.Tensor) or tuple(saved[k].shape) != v.shape for k, v in matrices.items()):
        refuse(f"its accuracy matrices are not {', '.join(matrices)} of shape {n_tasks}×{n_tasks}")
    losses = checkpoint["epoch_losses"]
    if not isinstance(losses, list) or len(losses) != next_task * n_epochs or not all(
            isinstance(v, float) for v in losses):
        refuse(f"epoch_losses is not a list of {next_task * n_epochs} losses ({next_task} tasks of {n_epochs} epochs)")
    if not isinstance(checkpoint["history"], dict) or not isinstance(checkpoint["model"], dict) or not checkpoint["model"]:
        refuse("its history or model state is not a mapping of saved values")
