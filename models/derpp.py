"""derpp: DER++ — DER's logit matching plus cross-entropy on a second buffer batch."""
from models import register_model
from models.der import Der


@register_model("derpp")
class Derpp(Der):
    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=0.2,
                            help="weight of the logit-matching (MSE) replay loss (DER paper, seq-cifar10 buffer 500: 0.2)")
        parser.add_argument("--beta", type=float, default=0.5,
                            help="weight of the replayed cross-entropy loss (DER paper, seq-cifar10 buffer 500: 0.5)")

    def replay_loss(self):
        return self.args.alpha * self.replay_logit_loss() + self.args.beta * self.replay_label_loss()
