"""Model architectures of the registered families (see common/tasks.py)."""

import math


def norm_groups(channels: int) -> int:
    """GroupNorm groups for a layer: up to 8, always dividing the channel count."""
    return math.gcd(channels, 8)
