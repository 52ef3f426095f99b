"""The subset-training run store: a plan file written first, then one atomically written file per model.

Layout of a store folder:
    plan.json        dataset, sizes, label fingerprints, ratios, seeds, training settings, hash
    plan_arrays.npz  inclusion_mask [K, n] bool, model_ratio [K], model_seed [K], train_indices [n]
    noisy_mask.npy   bool [N_train], dataset order: training examples whose label was replaced
    input_noise_mask.npy  bool [N_train]: training examples whose image was replaced by noise
    models/model_000042.npz   one model's predictions on every training and test example, its forgetting
                              events over its subset (forget_events_train int32, never_learned_train bool) and
                              the step from which each example stayed correct in training (learned_step_train)
    timing/group_000040.json  the seconds the group of models 40.. took to train
"""
from __future__ import annotations

import json
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np

from memorization.plan import Plan
from utils.errors import ConfigError

FORMAT_VERSION = 1
MODEL_KEYS = ("model_id", "plan_hash", "epochs", "prob_train", "correct_train", "prob_test", "correct_test")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed member time: the same arrays always make the same bytes


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _save_npz(path: Path, **arrays) -> None:
    """np.savez's format (one .npy member per array, stored), but byte-for-byte reproducible: np.savez
    stamps each member with the current time."""
    def write(temporary: Path):
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            for name, value in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    _atomic_write(path, write)


def _flatten(settings: dict) -> dict:
    """{'training': {'lr': 0.1}} → {'lr': 0.1}: nested settings under their own flag names."""
    flat = {}
    for key, value in settings.items():
        flat.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return flat


class CorruptModelFile(Exception):
    """A model file that cannot be read or does not belong to this plan."""


class SubsetStore:
    """A folder holding one plan and the per-model predictions trained under it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.models_dir = self.folder / "models"

    # -- plan ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.folder / "plan.json").exists()

    def write_plan(self, plan: Plan, replace_plan: bool = False) -> None:
        """Write a new plan, or check that the store already holds exactly this plan. A store whose plan.json is
        gone but whose models remain is another plan's unless its model files name this one: refused without
        `replace_plan`, so that a different command cannot set valid models aside and train over them."""
        if not self.exists() and not replace_plan:
            others = self._models_of_other_plans(plan.hash)
            if others:
                raise ConfigError(f"{self.folder} has no plan.json but holds {others} model files of another plan; "
                                  f"rerun the command that trained them (it writes its plan again), or pass "
                                  f"--replace_plan to set them aside and train this plan there")
        if self.exists():
            existing = self.load_plan()
            if existing.hash != plan.hash:
                old, new = _flatten(existing.settings), _flatten(plan.settings)
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                what = f"settings {', '.join(changed)} differ" if changed else "the inclusion masks differ"
                raise ConfigError(f"{self.folder} already holds another subset-training plan ({what}); "
                                  f"rerun with the original arguments to resume it, or pass a new --out")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(exist_ok=True)
        np.save(self.folder / "noisy_mask.npy", plan.noisy_mask)
        np.save(self.folder / "input_noise_mask.npy", plan.input_noise_mask)
        _save_npz(self.folder / "plan_arrays.npz", inclusion_mask=plan.inclusion_mask, model_ratio=plan.model_ratio,
                  model_seed=plan.model_seed, train_indices=plan.train_indices)
        document = {"format": FORMAT_VERSION, "hash": plan.hash, **plan.settings}
        # plan.json last: its presence marks a complete plan.
        _atomic_write(self.folder / "plan.json",
                      lambda p: p.write_text(json.dumps(document, indent=2, sort_keys=True)))

    def _models_of_other_plans(self, plan_hash: str) -> int:
        """How many model files in the store name another plan (or cannot be read)."""
        count = 0
        for model_id in self.stored_models():
            try:
                with np.load(self.model_path(model_id), allow_pickle=False) as data:
                    count += str(data["plan_hash"]) != plan_hash
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                count += 1
        return count

    def clean_leftovers(self, max_age: float) -> list[Path]:
        """Remove the temporary files of writes cut by a kill (`.NAME.PID.tmp`, a driver record being adopted)
        once untouched for `max_age` seconds; returns the removed paths. (A killed group's progress file is
        overwritten and removed by whoever trains the group next.)"""
        removed = []
        for folder in (self.folder, self.models_dir, self.folder / "progress", self.folder / "drivers",
                       self.folder / "timing"):
            for path in [*folder.glob(".*.tmp"), *folder.glob("*.adopted")]:
                try:
                    if time.time() - path.stat().st_mtime > max_age:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass
        return removed

    def plan_hash(self) -> str | None:
        """The hash plan.json records (None without a readable one): which plan the store holds now."""
        try:
            return json.loads((self.folder / "plan.json").read_text()).get("hash")
        except (OSError, ValueError, AttributeError):
            return None

    def load_plan(self) -> Plan:
        path = self.folder / "plan.json"
        if not path.exists():
            raise ConfigError(f"{self.folder} is not a subset-training store (no plan.json); pass the --out folder "
                              f"of a train_splits.py run")
        damaged = (f"the plan files in {self.folder} are damaged; the model files are kept, but the plan must be "
                   f"made again: rerun the original train_splits.py command with a new --out")
        try:
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or "hash" not in document:
                raise ValueError("not a plan document")
            saved_hash = document.pop("hash")
            if document.pop("format", None) != FORMAT_VERSION:
                raise ConfigError(f"{path} was written by another version of train_splits.py; retrain into a new --out")
            with np.load(self.folder / "plan_arrays.npz", allow_pickle=False) as arrays:
                plan = Plan(document, arrays["inclusion_mask"], arrays["model_ratio"], arrays["model_seed"],
                            arrays["train_indices"], np.load(self.folder / "noisy_mask.npy", allow_pickle=False),
                            np.load(self.folder / "input_noise_mask.npy", allow_pickle=False))
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ConfigError(f"{damaged} ({type(error).__name__})") from None
        if plan.hash != saved_hash:
            raise ConfigError(f"the plan files in {self.folder} do not match their hash (edited or damaged); "
                              f"start a new --out")
        return plan

    # -- models --------------------------------------------------------------------------------
    def model_path(self, model_id: int) -> Path:
        return self.models_dir / f"model_{model_id:06d}.npz"

    def write_model(self, model_id: int, plan_hash: str, **arrays) -> None:
        _save_npz(self.model_path(model_id), model_id=np.int64(model_id), plan_hash=np.array(plan_hash), **arrays)

    def read_model(self, model_id: int, plan: Plan) -> dict[str, np.ndarray]:
        """One model's arrays, fully read and checked against the plan; CorruptModelFile otherwise."""
        path = self.model_path(model_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}  # reading every member checks its CRC
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
            raise CorruptModelFile(f"{path.name} cannot be read ({type(error).__name__})") from None
        missing = [k for k in MODEL_KEYS if k not in arrays]
        n_train, n_test = plan.inclusion_mask.shape[1], plan.settings["n_test"]
        n_epochs = len(plan.record_points)
        if missing:
            raise CorruptModelFile(f"{path.name} lacks {', '.join(missing)}")
        if str(arrays["plan_hash"]) != plan.hash or int(arrays["model_id"]) != model_id:
            raise CorruptModelFile(f"{path.name} belongs to another plan or model")
        expected = {"prob_train": (n_epochs, n_train), "correct_train": (n_epochs, n_train),
                    "prob_test": (n_epochs, n_test), "correct_test": (n_epochs, n_test)}
        # Forgetting counts: in every file written since they are recorded, absent from older stores.
        expected.update({key: (n_train,) for key in ("forget_events_train", "never_learned_train",
                                                     "learned_step_train") if key in arrays})
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise CorruptModelFile(f"{path.name}: {key} has shape {arrays[key].shape}, expected {shape}")
        return arrays

    # -- training time (kept beside the model files, which hold only what the plan determines) -----------
    def write_timing(self, model_ids: list[int], seconds: float) -> None:
        """The seconds a group of models took to train, shared equally by its models."""
        path = self.folder / "timing" / f"group_{model_ids[0]:06d}.json"
        path.parent.mkdir(exist_ok=True)
        record = json.dumps({"model_ids": list(map(int, model_ids)), "seconds": float(seconds)})
        _atomic_write(path, lambda temporary: temporary.write_text(record))

    def training_seconds(self) -> dict[int, float]:
        """Each model's share of its group's training time, for the models whose group recorded it."""
        shares = {}
        for path in sorted((self.folder / "timing").glob("group_*.json")):
            try:
                record = json.loads(path.read_text())
                shares.update({int(m): record["seconds"] / len(record["model_ids"]) for m in record["model_ids"]})
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
                continue
        return shares

    # -- progress of groups being trained (read by the driver for its progress bar) ---------------
    def progress_path(self, first_model: int) -> Path:
        return self.folder / "progress" / f"group_{first_model:06d}"

    def write_progress(self, first_model: int, epochs_done: int) -> None:
        path = self.progress_path(first_model)
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, lambda temporary: temporary.write_text(str(epochs_done)))

    def read_progress(self, first_model: int) -> int:
        """Epochs finished by the group that starts with this model (0 when it has not reported)."""
        try:
            return int(self.progress_path(first_model).read_text())
        except (OSError, ValueError):
            return 0

    def clear_progress(self, first_model: int) -> None:
        self.progress_path(first_model).unlink(missing_ok=True)

    def is_stored(self, model_id: int, plan: Plan) -> bool:
        """A readable file of this model and plan exists."""
        try:
            self.read_model(model_id, plan)
            return True
        except CorruptModelFile:
            return False

    def stored_models(self) -> set[int]:
        """Model ids with a file in the store (not yet validated); other files there are not ours and are ignored."""
        if not self.models_dir.is_dir():
            return set()
        return {int(match.group(1)) for p in self.models_dir.glob("model_*.npz")
                if (match := re.fullmatch(r"model_(\d{6,})\.npz", p.name))}

    def set_aside(self, model_id: int) -> Path:
        """Rename a corrupt model file out of the way (kept for inspection, never read again)."""
        path = self.model_path(model_id)
        target = path.with_name(f"{path.stem}.corrupt-{int(time.time())}")
        os.replace(path, target)
        return target

    def finished_models(self, plan: Plan, repair: bool = False) -> tuple[list[int], list[str]]:
        """Ids of readable models of this plan, and a sentence per unreadable one (set aside if `repair`)."""
        good, problems = [], []
        for model_id in sorted(self.stored_models()):
            if model_id >= plan.n_models:
                problems.append(f"model_{model_id:06d}.npz is outside the plan's {plan.n_models} models")
                continue
            try:
                self.read_model(model_id, plan)
                good.append(model_id)
            except CorruptModelFile as error:
                if repair:
                    moved = self.set_aside(model_id)
                    problems.append(f"{error}; moved to {moved.name} and retrained")
                else:
                    problems.append(str(error))
        return good, problems
