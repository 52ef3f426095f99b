"""er: Experience Replay — the stream batch together with a batch drawn from the buffer."""
import torch

from models import ContinualModel, register_model


@register_model("er")
class Er(ContinualModel):
    USES_BUFFER = True

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        all_inputs, all_labels = inputs, labels
        if not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            all_inputs = torch.cat((inputs, replay["examples"]))
            all_labels = torch.cat((labels, replay["labels"]))
        loss = self.loss(self.net(all_inputs), all_labels)
        self.buffer.add_data(not_aug_inputs, labels, indices=indices, task_labels=torch.full_like(indices, task))
        return loss
