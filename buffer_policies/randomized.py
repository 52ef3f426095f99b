"""randomized: sample each class's examples with probability proportional to memorization, top 10% dropped."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy

DROPPED = 0.1


@register_policy("randomized")
class Randomized(MemorizationPolicy):
    def choose(self, values, k):
        order = np.argsort(values, kind="stable")
        pool = order[: max(len(order) - int(DROPPED * len(order)), k)]
        # Shift so every weight is positive (proxies such as learned_iteration start at 0).
        weights = values[pool] - values[pool].min() + 1e-6
        return self.generator.choice(pool, size=k, replace=False, p=weights / weights.sum())
