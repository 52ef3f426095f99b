"""max: keep the most memorized examples of each class."""
import numpy as np

from buffer_policies import register_policy
from buffer_policies._memorization import MemorizationPolicy


@register_policy("max")
class Max(MemorizationPolicy):
    def choose(self, values, k):
        return np.argsort(values, kind="stable")[len(values) - k:][::-1]
