"""maer: memorization-aware experience replay ("What is the role of memorization in Continual Learning?").

ER (or DER++ with --replay derpp) whose buffer policy re-selects, at the end of each task, which of
the task's examples to keep by a memorization value: precomputed scores (--mem_scores, from
eval_splits.py or the paper's released arrays) or an online proxy computed from the forward passes
training already makes (--mem_proxy). With both, the scores choose and the proxy is compared to them.
The re-selection itself is the replay contract's (models/__init__.py), shared with every replay model
that takes --mem_scores; the online proxy is maer's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models import ContinualModel, register_model
from models._memorization_proxy import PROXIES, MemorizationProxy
from utils.errors import ConfigError


@register_model("maer")
class Maer(ContinualModel):
    USES_BUFFER = True
    MEMORIZATION_VALUES = True
    REFERENCES = (*ContinualModel.REFERENCES, "scores")  # the dataset's --mem_scores, loaded again on resume

    @staticmethod
    def add_args(parser):
        parser.add_argument("--mem_proxy", choices=("none", *PROXIES), default="learned_iteration",
                            help="online memorization value (the paper's learned_iteration, or cumulative_loss)")
        parser.add_argument("--replay", choices=("er", "derpp"), default="er", help="the replay loss")
        parser.add_argument("--alpha", type=float, default=0.2, help="DER++ logit-matching weight (--replay derpp)")
        parser.add_argument("--beta", type=float, default=0.5, help="DER++ replayed CE weight (--replay derpp)")

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if args.mem_scores is None and args.mem_proxy == "none":
            raise ConfigError("maer needs memorization values: pass --mem_scores FILE.npy or a --mem_proxy")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.scores = dataset.mem_scores
        self.proxy = None if args.mem_proxy == "none" else MemorizationProxy(args.mem_proxy, len(dataset.train),
                                                                              self.device)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        batch_size = len(labels)
        all_inputs, all_labels = inputs, labels
        if self.args.replay == "er" and not self.buffer.is_empty():  # the buffer batch joins the stream batch
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            all_inputs = torch.cat((inputs, replay["examples"]))
            all_labels = torch.cat((labels, replay["labels"]))
        outputs = self.net(all_inputs)
        losses = F.cross_entropy(outputs, all_labels, reduction="none")
        loss = losses.mean()
        if self.args.replay == "derpp" and not self.buffer.is_empty():
            loss = loss + self.args.alpha * self.replay_logit_loss() + self.args.beta * self.replay_label_loss()
        if self.proxy is not None:  # the stream rows of the forward pass just made: no extra cost
            self.proxy.update(indices, outputs[:batch_size], labels, losses[:batch_size])
        self.buffer.add_data(not_aug_inputs, labels, indices=indices, task_labels=torch.full_like(indices, task),
                             logits=outputs[:batch_size].detach() if self.args.replay == "derpp" else None)
        return loss

    def memorization_values(self) -> np.ndarray:
        return self.scores if self.scores is not None else self.proxy.values()

    def task_record(self, task: int) -> dict:
        """The contract's selection record, and the proxy's Spearman correlation with the scores."""
        record = super().task_record(task)
        if self.scores is not None and self.proxy is not None:
            seen = self.dataset.train_split(task).indices.cpu().numpy()
            proxy, scores = self.proxy.values()[seen], self.scores[seen]
            both = np.isfinite(proxy) & np.isfinite(scores)
            if both.sum() > 2:
                from scipy.stats import spearmanr  # importing scipy.stats takes a second or two

                record["metrics"][f"spearman_{self.proxy.kind}_vs_scores"] = float(
                    spearmanr(proxy[both], scores[both]).statistic)
        return record
