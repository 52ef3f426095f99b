"""gss: Gradient-based Sample Selection (GSS), the greedy version.

R. Aljundi, M. Lin, B. Goujaud, Y. Bengio, "Gradient based sample selection for online continual
learning", NeurIPS 2019.

Training is ER's: each stream batch is concatenated with a batch from the buffer and the network takes
a cross-entropy step on the whole; with --batch_num k it takes k such steps on the same stream batch,
with k successive replay batches. Then the stream batch is offered to the buffer, which chooses what to
keep by gradient diversity (the paper's GSS-Greedy, as Mammoth's models/gss.py and utils/gss_buffer.py):

- gradients are those of the cross-entropy with the network in evaluation mode, flattened over all
  trainable parameters; the score of a gradient g against a set of stored examples' gradients G_j is
  1 + max_j cos(g, G_j), in [0, 2], a stored example's score is the one it entered with;
- the batch's score c is that of the batch's mean-loss gradient against a random subset of
  --gss_minibatch_size stored examples (default --minibatch_size), drawn once per batch; 0.1 for the
  first batch, when the buffer is empty;
- while the buffer has room, each example takes the next free slot with the score c;
- once it is full, and only if c < 1 (the batch's gradient points away from every sampled one), each
  example gets its own score c_i against the same subset; a stored slot i is drawn with probability
  proportional to its score, and the example replaces it with probability s_i / (s_i + c_i), taking c_i
  as the slot's score. Examples are decided one after another, so a later one sees the scores the
  earlier ones left.

Replay batches walk one random permutation of the buffer, drawn per stream batch (Mammoth's `fathom`:
with --batch_num > 1 the steps take successive slices of it). The draws are Mammoth's: the permutation
from torch's global generator on the CPU, the subset and the replacement draws from numpy's global
generator, in Mammoth's order, so the same seeds give the same choices
(benchmarks/mammoth_parity_gem_gss.py). Mammoth computes the selection gradients on the stored images
as they are (unnormalised pixels); here they see the network's evaluation input (`test_transform`:
normalised, unaugmented), the same on datasets without normalisation (the MNIST family). GSS selects
its own buffer, so --buffer_policy must stay reservoir.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from buffer_policies import Buffer, BufferPolicy
from models import ContinualModel, register_model
from utils.errors import ConfigError

FIRST_BATCH_SCORE = 0.1  # the score of the first batch, which has nothing stored to compare with (Mammoth)
PER_EXAMPLE_FLOATS = 2 ** 27  # per-example gradient entries held at once (512 MiB in float32)


def gradient_score(g: torch.Tensor, stored: torch.Tensor) -> float:
    """1 + the largest cosine similarity between the gradient g [P] and the rows of `stored` [k, P]."""
    return F.cosine_similarity(g.unsqueeze(0), stored, dim=1).max().item() + 1


class GradientScoredSelection(BufferPolicy):
    """GSS-Greedy's choice of slots (the module's docstring); `scores` holds each slot's score."""

    NAME = "gss_greedy"
    REFERENCES = ("args", "buffer", "model")

    def __init__(self, args, model: "Gss"):
        super().__init__(args)
        self.model = model
        self.scores = np.zeros(args.buffer_size, dtype=np.float32)

    def insert(self, buffer, offered):
        n_rows, capacity, n_seen = len(offered.labels), buffer.capacity, buffer.n_seen
        stored = len(buffer)
        subset_grads = None
        if stored:
            subset_size = self.args.gss_minibatch_size or self.args.minibatch_size
            subset = torch.from_numpy(np.random.choice(stored, size=min(subset_size, stored), replace=False))
            subset = subset.to(buffer.device)
            subset_grads = self.model.example_gradients(buffer.examples[subset], buffer.labels[subset])
            batch_score = gradient_score(self.model.batch_gradient(offered.examples, offered.labels), subset_grads)
        else:
            batch_score = FIRST_BATCH_SCORE
        slot_of_row: dict[int, int] = {}
        row_scores = None
        for row in range(n_rows):
            if n_seen + row < capacity:
                slot, score = n_seen + row, batch_score
            elif batch_score < 1 and subset_grads is not None:  # a first batch larger than the buffer: nothing to score
                if row_scores is None:  # the rows still to decide, in one pass
                    grads = self.model.example_gradients(offered.examples[row:], offered.labels[row:])
                    row_scores = {row + k: gradient_score(g, subset_grads) for k, g in enumerate(grads)}
                score = row_scores[row]
                s = self.scores
                slot = int(np.random.choice(np.arange(0, capacity), size=1, p=s / s.sum())[0])
                if not np.random.rand(1)[0] < s[slot] / (s[slot] + score):
                    continue
            else:
                continue
            self.scores[slot] = score
            slot_of_row[slot] = row  # a later row of the batch that takes the same slot overwrites it
        slots = torch.tensor(sorted(slot_of_row), dtype=torch.long, device=offered.labels.device)
        rows = torch.tensor([slot_of_row[s] for s in sorted(slot_of_row)], dtype=torch.long,
                            device=offered.labels.device)
        return slots, rows


@register_model("gss")
class Gss(ContinualModel):
    """ER's step on the stream batch with a replay batch (--batch_num times); GSS-Greedy chooses the buffer."""

    USES_BUFFER = True
    BOUNDS = {"batch_num": "[1, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--batch_num", type=int, default=1,
                            help="optimizer steps on each stream batch, each with its own replay batch (Mammoth's gss)")
        parser.add_argument("--gss_minibatch_size", type=int, default=None,
                            help="stored examples whose gradients an incoming batch is compared with "
                                 "(default: --minibatch_size, as Mammoth's gss)")

    @classmethod
    def check_args(cls, args):
        if args.buffer_policy != "reservoir":
            raise ConfigError(f"gss chooses its buffer's contents by gradient diversity; drop --buffer_policy "
                              f"{args.buffer_policy}")
        if args.gss_minibatch_size is not None and args.gss_minibatch_size < 1:
            raise ConfigError(f"--gss_minibatch_size must be at least 1, got {args.gss_minibatch_size}; pass a "
                              f"positive size or leave it out for --minibatch_size")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.buffer = Buffer(args.buffer_size, self.device, GradientScoredSelection(args, self),
                             scorer=self.eval_logits)
        self.steps_to_offer = 0  # optimizer steps left on the current stream batch before it is offered

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        stored = len(self.buffer)
        order = torch.randperm(stored).to(self.device)  # Mammoth's reset_fathom: CPU draw, one per stream batch
        position = 0
        self.steps_to_offer = self.args.batch_num
        for step in range(self.args.batch_num):
            x, y = inputs, labels
            if stored:
                chosen = order[position:position + self.args.minibatch_size]
                position = position + len(chosen) if position + len(chosen) < stored else 0
                x = torch.cat([inputs, self.transform(self.buffer.examples[chosen])])
                y = torch.cat([labels, self.buffer.labels[chosen]])
            loss = self.loss(self.net(x), y)
            if step < self.args.batch_num - 1:  # the task loop takes the last step
                self.optimizer_step(loss)
        return loss

    def after_step(self, batch):
        self.steps_to_offer -= 1
        if self.steps_to_offer == 0:  # after the last step on the batch, as Mammoth's add_data
            self.buffer.add_data(batch.not_aug_inputs, batch.labels, indices=batch.indices,
                                 task_labels=torch.full_like(batch.indices, batch.task))

    # -- the selection's gradients: evaluation mode, cross-entropy, all trainable parameters ------------
    def batch_gradient(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[P]: the gradient of the mean cross-entropy over uint8 `images` (leaves .grad alone)."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        was_training = self.net.training
        self.net.eval()
        with torch.enable_grad():
            loss = self.loss(self.net(self.dataset.test_transform(images)), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.net.train(was_training)
        return torch.cat([(d if d is not None else torch.zeros_like(p)).reshape(-1) for d, p in zip(grads, params)])

    def example_gradients(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[N, P]: the gradient of each example's cross-entropy (uint8 `images`), in chunks, evaluation mode."""
        names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in self.net.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in self.net.named_parameters() if not p.requires_grad}
        buffers = dict(self.net.named_buffers())

        def loss(params, x, y):
            out = functional_call(self.net, ({**params, **frozen}, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        n_params = sum(p.numel() for p in params.values())
        chunk = max(1, PER_EXAMPLE_FLOATS // max(n_params, 1))
        was_training = self.net.training
        self.net.eval()
        rows = []
        with torch.enable_grad():
            for start in range(0, len(labels), chunk):
                grads = per_example(params, self.dataset.test_transform(images[start:start + chunk]),
                                    labels[start:start + chunk])
                rows.append(torch.cat([grads[n].flatten(1) for n in names], dim=1))
        self.net.train(was_training)
        return torch.cat(rows)
