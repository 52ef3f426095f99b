"""max_drop_highest (the paper's 0.9max): the most memorized examples after dropping the top 10% (likely label errors)."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy

DROPPED = 0.1


@register_policy("max_drop_highest", aliases=("0.9max",))
class MaxDropHighest(MemorizationPolicy):
    def choose(self, values, k):
        order = np.argsort(values, kind="stable")
        stop = max(len(order) - int(DROPPED * len(order)), k)  # never return fewer than k
        return order[stop - k:stop][::-1]
