"""min: keep the least memorized examples of each class (the typical ones)."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy


@register_policy("min")
class Min(MemorizationPolicy):
    def choose(self, values, k):
        return np.argsort(values, kind="stable")[:k]
