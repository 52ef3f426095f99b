"""maer: memorization-aware experience replay ("What is the role of memorization in Continual Learning?").

ER (or DER++ with --replay derpp) whose buffer policy re-selects, at the end of each task, which of
the task's examples to keep by a memorization value: precomputed scores (--mem_scores, from
eval_splits.py or the paper's released arrays) or an online proxy computed from the forward passes
training already makes (--mem_proxy). With both, the scores choose and the proxy is compared to them.
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
        self.selection: dict = {}

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

    def begin_task(self, task):
        if self.buffer.policy.NEEDS_MEMORIZATION_VALUES:
            self.buffer.policy.begin_task(self.buffer, task, self.classes_of_tasks(task), self.memorization_values())

    def classes_of_tasks(self, task: int) -> list[range]:
        return [self.dataset.task_classes(t) for t in range(task + 1)]

    @torch.no_grad()
    def end_task(self, task):
        policy = self.buffer.policy
        if not policy.NEEDS_MEMORIZATION_VALUES:
            return
        split = self.dataset.train_split(task)
        candidates = {"examples": split.images, "labels": split.labels, "indices": split.indices,
                      "task_labels": torch.full_like(split.indices, task)}
        if self.buffer.logits is not None:  # DER++ targets for newly chosen examples: the logits now
            self.net.eval()
            candidates["logits"] = torch.cat([self.net(self.dataset.test_transform(split.images[i:i + 512]))
                                              for i in range(0, len(split), 512)])
            self.net.train()
        values = self.memorization_values()
        policy.end_task(self.buffer, task, self.classes_of_tasks(task), candidates, values)
        kept = {k: v.cpu().numpy() for k, v in self.buffer.get_all().items() if k in ("indices", "labels")}
        task_values = values[split.indices.cpu().numpy()]
        self.selection = {"task": task, "kept": kept, "task_values": task_values,
                          "buffer_values": values[kept["indices"]],
                          "undefined": int(np.isnan(task_values).sum())}

    def task_record(self, task: int) -> dict:
        """What to log after a task: kept indices, class counts, value histograms, proxy–score agreement."""
        record = {"metrics": {}, "arrays": {}, "histograms": {}}
        if self.selection.get("task") == task:
            kept = self.selection["kept"]
            record["arrays"][f"buffer/indices_task_{task}.npy"] = kept["indices"]
            classes, counts = np.unique(kept["labels"], return_counts=True)
            record["metrics"].update({f"buffer_count_class_{c}": int(n) for c, n in zip(classes, counts)})
            record["metrics"]["mem_values_undefined"] = self.selection["undefined"]
            record["histograms"][f"buffer/values_task_{task}.png"] = (self.selection["task_values"],
                                                                      self.selection["buffer_values"])
        if self.scores is not None and self.proxy is not None:
            seen = self.dataset.train_split(task).indices.cpu().numpy()
            proxy, scores = self.proxy.values()[seen], self.scores[seen]
            both = np.isfinite(proxy) & np.isfinite(scores)
            if both.sum() > 2:
                from scipy.stats import spearmanr  # importing scipy.stats takes a second or two

                record["metrics"][f"spearman_{self.proxy.kind}_vs_scores"] = float(
                    spearmanr(proxy[both], scores[both]).statistic)
        return record

    def extra_state(self):
        state = super().extra_state()
        if self.proxy is not None:
            state["proxy"] = self.proxy.state_dict()
        return state

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if self.proxy is not None:
            self.proxy.load_state_dict(state["proxy"])
