"""er: Experience Replay — the stream batch together with a batch drawn from the buffer."""
import torch

from models import register_model
from utils.continual_model import ContinualModel


@register_model("er")
class Er(ContinualModel):
    USES_BUFFER = True

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        batch_size = len(labels)
        if not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            inputs = torch.cat((inputs, replay["examples"]))
            labels = torch.cat((labels, replay["labels"]))
        loss = self.loss(self.net(inputs), labels)
        self.sgd_step(loss)
        self.buffer.add_data(not_aug_inputs, labels[:batch_size], indices=indices,
                             task_labels=torch.full_like(indices, task))
        return loss.detach()
