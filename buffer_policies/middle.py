"""middle: keep a window of each class's examples centred on its median memorization value."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy


@register_policy("middle")
class Middle(MemorizationPolicy):
    def choose(self, values, k):
        order = np.argsort(values, kind="stable")
        start = max(0, min(len(order) - k, len(order) // 2 - k // 2))
        return order[start:start + k]
