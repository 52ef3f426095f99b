"""main.py --forgetting_events: each stream example's correctness at every presentation, read from the forward
pass the model makes on its batch in `observe`, counted as forgetting events (memorization/forgetting.py
holds the definitions), and saved at the end of the run as a score file that `--mem_scores` accepts.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

from datasets import ContinualDataset
from memorization.forgetting import ForgettingEvents, forgetting_values, sidecar, summary
from memorization.plan import fingerprint
from memorization.score_format import original_train_labels

ARTIFACT = "forgetting/events.npy"


class StreamRecorder:
    """Forgetting events of the stream examples, read during `observe` by a forward hook on the network.

    The first forward pass of the network during `observe` whose input begins with the stream batch (the
    batch itself, or the batch with replay examples appended, as ER concatenates them) gives the batch's
    predictions: its first B output rows, argmax == label. Rows of that input that differ from the stream
    batch are not counted and are reported as presentations not found. A model that makes no forward pass
    on the stream batch (gdumb, whose stream only fills its memory) gets one extra forward pass of the
    batch without gradients, in eval mode, so that no BatchNorm statistic or random draw changes the run.

    The hook stays on the network from the first `observe` of a task to `detach`, which the task loop calls
    before the model's `end_task` (where methods copy the network); outside `observe` it does nothing.
    Registering it for each call instead cost more than the recording itself (about 100 µs per step on
    the CPU, measured with a 784-100-100-10 MLP).
    """

    def __init__(self, n_examples: int, device: torch.device | str):
        self.net: nn.Module | None = None  # the network the hook is on
        self._handle = None
        self.events = ForgettingEvents(n_examples, device)
        self.offered = 0  # stream rows given to observe; those not counted as presentations were not found
        self.extra_forwards = 0  # batches that needed a forward pass of their own
        self._pending = None

    def observe(self, net: nn.Module, observe, inputs: torch.Tensor, labels: torch.Tensor,
                not_aug_inputs: torch.Tensor, indices: torch.Tensor, task: int):
        """`observe(...)` (the model's, through its lifecycle), recording the batch's predictions from the forward
        passes it makes on `net`."""
        if self.net is not net:
            self.detach()
            self.net, self._handle = net, net.register_forward_hook(self._hook)
        self._pending = (inputs, labels, indices)
        self.offered += inputs.shape[0]
        try:
            loss = observe(inputs, labels, not_aug_inputs, indices, task)
        except BaseException:
            self._pending = None
            raise
        if self._pending is not None:  # no forward pass of the network began with the stream batch
            self._pending = None
            self.extra_forwards += 1
            was_training = self.net.training
            self.net.eval()
            with torch.no_grad():
                outputs = self.net(inputs)
            self.net.train(was_training)
            self.events.update(indices, outputs.argmax(1) == labels)
        return loss

    def detach(self) -> None:
        """Take the hook off the network (the task loop calls this before the model's end_task)."""
        if self._handle is not None:
            self._handle.remove()
        self.net = self._handle = None

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        if self._pending is None or module is not self.net or not args:
            return
        inputs, labels, indices = self._pending
        x, size = args[0], inputs.shape[0]  # shape, not len(): len() of a tensor costs a few µs more
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.dim() == 2
                and x.shape[0] >= size and x.shape[1:] == inputs.shape[1:]):
            return
        same = None  # rows of x that are the stream batch: all of them, or a mask computed on the device
        if x is not inputs:
            head = x[:size]
            if head.is_cuda or not torch.equal(head, inputs):  # torch.equal would wait for the GPU
                same = (head == inputs).flatten(1).all(1)
        self._pending = None
        self.events.update(indices, output[:size].argmax(1) == labels, same)

    def state_dict(self) -> dict:
        return {"events": self.events.state_dict(), "offered": self.offered, "extra_forwards": self.extra_forwards}

    def load_state_dict(self, state: dict) -> None:
        self.events.load_state_dict(state["events"])
        self.offered = int(state["offered"])
        self.extra_forwards = int(state["extra_forwards"])


def log_forgetting(logger, recorder: StreamRecorder, dataset: ContinualDataset, args: argparse.Namespace,
                   step: int) -> dict:
    """The score file (`forgetting/events.npy`, float32, dataset order) with its sidecar, the raw counts,
    never-learned flags and presentation counts as artifacts, and their summary as metrics at `step`, the number
    of tasks trained (where every task-level metric of the last task is)."""
    arrays = {key: value[0] for key, value in recorder.events.arrays().items()}
    values = forgetting_values(arrays["events"], arrays["never_learned"], arrays["presentations"] > 0)
    meta = sidecar(dataset.NAME, len(dataset.train), fingerprint(original_train_labels(dataset)),
                   args.label_noise, args.seed, values, arrays["never_learned"],
                   presentations_not_found=recorder.offered - int(arrays["presentations"].sum()),
                   extra_forward_batches=recorder.extra_forwards, run_id=getattr(logger, "run_id", None),
                   files={"events": "counts.npy", "never_learned": "never_learned.npy",
                          "presentations": "presentations.npy"})
    logger.log_array(values, ARTIFACT)
    logger.log_text(json.dumps(meta, indent=2), "forgetting/events.json")
    logger.log_array(arrays["events"], "forgetting/counts.npy")
    logger.log_array(arrays["never_learned"], "forgetting/never_learned.npy")
    logger.log_array(arrays["presentations"], "forgetting/presentations.npy")
    metrics = summary(values, arrays["never_learned"])
    logger.log_metrics({f"forgetting_events/{k}": float(v) for k, v in metrics.items() if np.isfinite(v)},
                       step=step)
    return {"values": values, **arrays, "sidecar": meta}
