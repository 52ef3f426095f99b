"""Forgetting events per training example (Toneva et al. 2019, "An empirical study of example forgetting
during deep neural network learning"), shared by main.py --forgetting_events and train_splits.py.

Definitions:

- A *presentation* of a training example is its appearance in a training minibatch. Its correctness at that
  presentation is read from the forward pass training makes on the batch (training mode, the augmented
  input, before the optimizer step): the argmax over all of the network's outputs equals the example's
  training label (the paper's reading, and maer's online proxy's).
- A *forgetting event* is a transition from correct at one presentation of an example to wrong at its next
  presentation. An example presented in several tasks (domain-IL streams, `joint`) counts the transitions
  across tasks too; replay presentations from a buffer are not presentations here.
- An example is *learned* when it is correct at some presentation; a presented example that never is, is
  *never learned*. The paper counts never-learned examples as forgotten infinitely often, so that they sort
  as the most forgotten.

Value in a score file (float32, dataset order): the number of forgetting events; a never-learned example
gets the largest count among the learned examples of the same file (or, pooled over models, of the same
model) plus one; an example never presented gets NaN. Max + 1 rather than +inf: it keeps the paper's order
for everything that ranks (Spearman, the buffer policies, buckets), while the tools that treat non-finite
values as undefined (the report's rankings, `eval_splits.py --compare`, histograms) still use those
examples. The never-learned flags are stored beside the value, so a reader can apply another convention.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memorization.score_format import array_digest, save_scores
from memorization.store import SubsetStore

NEVER_PRESENTED, CORRECT = -1, 1  # the last correctness of an example (0: wrong)
DEFINITION = ("forgetting events (Toneva et al. 2019): transitions from correct to wrong between consecutive "
              "presentations of an example in training minibatches; never learned = largest count among learned "
              "examples + 1; never presented = NaN")


def count_events(correct) -> tuple[np.ndarray, np.ndarray]:
    """Forgetting events and the never-learned flag from correctness at consecutive presentations.

    `correct`: [presentations] for one example, or [presentations, examples], one column per example.
    """
    correct = np.asarray(correct, dtype=bool)
    events = (correct[:-1] & ~correct[1:]).sum(0)
    return events, ~correct.any(0)


def forgetting_values(events: np.ndarray, never_learned: np.ndarray, presented: np.ndarray) -> np.ndarray:
    """The score-file value per example (last axis), row by row: count, never learned = row's max + 1, NaN
    where never presented."""
    events, presented = np.asarray(events, dtype=np.float32), np.asarray(presented, dtype=bool)
    never_learned = np.asarray(never_learned, dtype=bool) & presented
    learned = presented & ~never_learned
    top = np.max(events, axis=-1, keepdims=True, initial=0.0, where=learned)
    values = np.where(never_learned, top + 1, events).astype(np.float32)
    values[~presented] = np.nan
    return values


class ForgettingEvents:
    """Online forgetting counts of `rows` learners (models of a group, or one network) over `n` examples.

    `update` only queues the step's examples and correctness (views of device tensors, no synchronisation);
    every FLUSH_STEPS steps, and before the counts are read or saved, the queue is counted in one pass:
    the presentations sorted stably by example keep each example's time order, and a forgetting event is
    an entry that is wrong after a correct one (the first entry of an example compares with its last
    presentation before the queue). Subset training, whose epoch presents an example at most once per
    model, counts each epoch at once with `count_once` instead.
    """

    FLUSH_STEPS = 500

    def __init__(self, n: int, device: torch.device | str, rows: int = 1):
        self.n, self.rows = n, rows
        self.last = torch.full((rows, n), NEVER_PRESENTED, dtype=torch.int8, device=device)
        self.events = torch.zeros(rows, n, dtype=torch.int32, device=device)
        self.learned = torch.zeros(rows, n, dtype=torch.bool, device=device)
        self.presentations = torch.zeros(rows, n, dtype=torch.int32, device=device)
        self._offsets = torch.arange(rows, device=device)[:, None] * n
        self._queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def update(self, index: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One presentation of the examples `index` ([rows, B], or [B] for one row) with their correctness;
        `valid` (same shape) leaves out entries that were not presentations."""
        self._queue.append((index, correct, valid))
        if len(self._queue) >= self.FLUSH_STEPS:
            self.flush()

    def flush(self) -> None:
        """Count the queued presentations into the totals."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        def rows(tensors):  # [rows, P], time order along P
            return torch.cat([t.reshape(self.rows, -1) for t in tensors], 1)

        flat = (rows([i for i, _, _ in queue]) + self._offsets).view(-1)
        correct = rows([c for _, c, _ in queue]).view(-1)
        if any(v is not None for _, _, v in queue):
            valid = rows([torch.ones_like(c) if v is None else v for _, c, v in queue]).view(-1)
            flat, correct = flat[valid], correct[valid]
        # sorted stably by example, each example's entries stay in time order (int32 keys sort in half the time)
        order = torch.sort(flat.int() if self.rows * self.n < 2 ** 31 else flat, stable=True).indices
        flat, correct = flat.index_select(0, order), correct.index_select(0, order)  # not x[order]: 4x faster
        starts = torch.ones_like(correct)
        starts[1:] = flat[1:] != flat[:-1]  # an example's first entry in the queue
        before = torch.cat([correct[:1], correct[:-1]])
        before = torch.where(starts, self.last.view(-1).index_select(0, flat) == CORRECT, before)
        self.events.view(-1).index_add_(0, flat, (before & ~correct).int())
        self.presentations.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.learned.view(-1)[flat.masked_select(correct)] = True
        ends = torch.cat([starts[1:], starts[:1]]).nonzero()[:, 0]  # an example's last entry in the queue
        self.last.view(-1)[flat.index_select(0, ends)] = correct.index_select(0, ends).to(torch.int8)

    def count_once(self, index: torch.Tensor, correct: torch.Tensor) -> None:
        """Presentations [rows, P] in which a row presents each example at most once (an epoch of subset
        training), with their correctness: counted by gathering and scattering along each row, without the
        sort that `update`'s queue needs (13 µs a step at K=16 on digits, against 35-40 µs queued)."""
        self.flush()  # the queue's presentations came first
        index, correct = index.reshape(self.rows, -1), correct.reshape(self.rows, -1)
        times = torch.zeros_like(self.presentations).scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
        if times.max() > 1:
            raise ValueError("count_once was given an example twice in a row; queue such presentations with update")
        correct = correct.bool()
        before = self.last.gather(1, index) == CORRECT
        self.events.scatter_add_(1, index, (before & ~correct).int())
        self.presentations += times
        self.learned.scatter_(1, index, self.learned.gather(1, index) | correct)
        self.last.scatter_(1, index, correct.to(torch.int8))

    def arrays(self) -> dict[str, np.ndarray]:
        """Per row and example: events (int32), never_learned (bool, presented and never correct), presentations."""
        self.flush()
        presentations = self.presentations.cpu().numpy()
        return {"events": self.events.cpu().numpy(), "presentations": presentations,
                "never_learned": (presentations > 0) & ~self.learned.cpu().numpy()}

    def state_dict(self) -> dict:
        self.flush()
        return {"last": self.last, "events": self.events, "learned": self.learned,
                "presentations": self.presentations}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)


def summary(values: np.ndarray, never_learned: np.ndarray) -> dict[str, float]:
    """Counts of a score file: presented, never learned, unforgettable (learned, never forgotten), mean events."""
    presented = np.isfinite(values)
    learned = presented & ~never_learned
    return {"n_presented": int(presented.sum()), "n_never_learned": int(never_learned.sum()),
            "n_unforgettable": int((learned & (values == 0)).sum()),
            "mean_events_learned": float(values[learned].mean()) if learned.any() else float("nan")}


def sidecar(dataset: str, n: int, label_fingerprint: str, label_noise, seed, values: np.ndarray,
            never_learned: np.ndarray, **extra) -> dict:
    """The JSON beside a forgetting score file, in the score-file format `--mem_scores` checks."""
    never_value = np.unique(values[never_learned])
    return {"dataset": dataset, "n": int(n), "label_fingerprint": label_fingerprint, "label_noise": label_noise,
            "seed": seed, "score": "forgetting_events", "definition": DEFINITION,
            "never_learned_value": float(never_value[0]) if never_value.size == 1 else None,  # one file's max + 1
            "n_undefined": int(np.isnan(values).sum()), **summary(values, never_learned), **extra,
            "scores_sha256": array_digest(values)}  # binds the sidecar to these values' file (score_format.py)


def pool_models(events: np.ndarray, never_learned: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per example over models [K, n]: the mean of each model's value over the models that trained on it
    (NaN where none did) and the fraction of them that never learned it."""
    values = forgetting_values(events, never_learned, mask)
    n_in = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(n_in > 0, np.nansum(values, 0) / n_in, np.nan).astype(np.float32)
        fraction = np.where(n_in > 0, (never_learned & mask).sum(0) / n_in, np.nan).astype(np.float32)
    return {"value": pooled, "never_learned_fraction": fraction}


def read_model_events(store, model_ids: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored per-model counts [K, n] and never-learned flags of these (already checked) models; None when
    a model file has none (a store trained before they were recorded). Reads only those two members."""
    events, never = [], []
    for model_id in model_ids:
        with np.load(store.model_path(model_id), allow_pickle=False) as data:
            if "forget_events_train" not in data.files:
                return None
            events.append(data["forget_events_train"])
            never.append(data["never_learned_train"])
    return np.stack(events), np.stack(never)


def spearman_defined(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation over the examples where both values are defined (NaN with fewer than 3)."""
    from scipy.stats import spearmanr  # imported by what uses it: main.py's start-up does not

    both = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[both], b[both]).statistic) if both.sum() >= 3 else float("nan")


def write_pooled_scores(run_dir, plan, model_ids: list[int], mask: np.ndarray, rows: np.ndarray, n_total: int,
                        stem: Path, mem: np.ndarray) -> dict | None:
    """`<stem>_forgetting.npy` (dataset order, NaN where no model trained on the example) with its sidecar
    and `<stem>_forgetting_never_learned.npy`. Returns the values of the plan's rows, their Spearman
    correlation with the memorization scores `mem` (same rows) and the files; None for a store without
    recorded counts."""
    store = SubsetStore(run_dir)
    stored = read_model_events(store, model_ids)
    if stored is None:
        print(f"{store.folder}: no forgetting counts in its model files (trained before they were recorded); "
              f"no forgetting score written")
        return None
    pooled = pool_models(stored[0], stored[1], mask.astype(bool))
    values = np.full(n_total, np.nan, dtype=np.float32)
    values[rows] = pooled["value"]
    fraction = np.full(n_total, np.nan, dtype=np.float32)
    fraction[rows] = pooled["never_learned_fraction"]
    np.save(f"{stem}_forgetting_never_learned.npy", fraction)
    settings, rho = plan.settings, spearman_defined(pooled["value"], np.asarray(mem, dtype=np.float32))
    never_all = np.zeros(n_total, dtype=bool)
    never_all[rows] = pooled["never_learned_fraction"] == 1
    meta = sidecar(settings["dataset"], n_total, settings["label_fingerprint"], settings["label_noise"],
                   settings["seed"], values, never_all, plan_hash=plan.hash, n_models=len(model_ids),
                   pooling="per model: its count, never learned = its max + 1; then the mean over the models "
                           "that trained on the example", spearman_with_memorization=rho if np.isfinite(rho) else None,
                   files={"never_learned_fraction": f"{stem.name}_forgetting_never_learned.npy"})
    save_scores(Path(f"{stem}_forgetting.npy"), values, meta)
    print(f"{stem}_forgetting.npy: forgetting events of {int(np.isfinite(values).sum())} examples, mean over the "
          f"models that trained on each; Spearman with memorization {rho:.3f}")
    return {"values": pooled["value"], "spearman_with_mem": rho,
            "files": [Path(f"{stem}_forgetting{end}") for end in (".npy", ".json", "_never_learned.npy")]}
