"""min_skip_lowest (the paper's 0.1min): the least memorized examples after skipping the lowest 10% (too easy to teach anything)."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy

SKIPPED = 0.1


@register_policy("min_skip_lowest", aliases=("0.1min",))
class MinSkipLowest(MemorizationPolicy):
    def choose(self, values, k):
        order = np.argsort(values, kind="stable")
        start = min(int(SKIPPED * len(order)), len(order) - k)  # never return fewer than k
        return order[start:start + k]
