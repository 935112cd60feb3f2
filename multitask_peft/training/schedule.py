"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

NO_DECAY_KEYS = ("bias", "norm", "prompt", "vqt_queries", "ssf", "bitfit")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, prompts, VQT queries, SSF / BitFit parameters and every tensor with ndim <= 1 are not decayed."""
    lowered = name.lower()
    return param.ndim <= 1 or any(key in lowered for key in NO_DECAY_KEYS)


def param_groups(
    named: Iterable[tuple[str, nn.Parameter, bool]], lr: float, head_lr: float, weight_decay: float, prefix: str = ""
) -> list[dict]:
    """AdamW parameter groups from (name, parameter, is_head) triples: {peft, head} x {decay, no_decay}.

    Empty groups are left out; each group carries a "name" (kept in the optimizer state, and the key of the learning
    rates in the training log): "peft_decay", ..., or "<prefix>/peft_decay", ... with a `prefix` (a task's name).
    """
    groups: dict[str, dict] = {}
    for name, param, is_head in named:
        kind = "head" if is_head else "peft"
        decay = not no_weight_decay(name, param)
        key = f"{kind}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": head_lr if is_head else lr,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    order = ("peft_decay", "peft_no_decay", "head_decay", "head_no_decay")
    kept = [groups[k] for k in order if k in groups]
    if prefix:
        for group in kept:
            group["name"] = f"{prefix}/{group['name']}"
    return kept


class WarmupCosine:
    """LR multiplier for `LambdaLR`: linear warm-up to 1 over `warmup_steps`, then cosine to `min_lr_ratio`.

    Step s (0-based, the s-th optimizer step) uses `(s + 1) / warmup_steps` during warm-up, then
    `min + (1 - min) * (1 + cos(pi * t)) / 2` with t = (s - warmup) / (total - warmup) in [0, 1).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
