"""Performance-Parameter Trade-off (PPT) from the V-PEFT benchmark."""

from __future__ import annotations

import math

PPT_C = 1e7


def ppt(metric: float, num_params: float, c: float = PPT_C) -> float:
    """`PPT = M * exp(-log10(P / C + 1))`.

    Args:
        metric: Task metric as a fraction in [0, 1].
        num_params: Trainable parameters excluding the head.
        c: Normalising constant (1e7 in the benchmark).
    """
    if not 0.0 <= metric <= 1.0:
        raise ValueError(f"`metric` should be a fraction in [0, 1] but the value passed is {metric!r}")
    if num_params < 0:
        raise ValueError(f"`num_params` should be >= 0 but the value passed is {num_params!r}")
    return metric * math.exp(-math.log10(num_params / c + 1.0))
