"""Combining per-task losses: fixed weights or homoscedastic uncertainty weighting (Kendall et al., 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class LossWeighting(nn.Module):
    """total = sum_t w_t * L_t ("fixed"), or sum_t w_t * exp(-s_t) * L_t + s_t ("uncertainty").

    s_t = log(sigma_t ** 2) is a learned log-variance per task (initialised at 0, i.e. weight 1), optimised
    with the model; a task whose loss stays high gets a lower weight, bounded by the `+ s_t` regulariser.

    Args:
        tasks: Task names.
        weights: Fixed weight per task.
        mode: "fixed" or "uncertainty".
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], mode: str = "fixed") -> None:
        super().__init__()
        if mode not in ("fixed", "uncertainty"):
            raise ValueError(f"loss weighting must be 'fixed' or 'uncertainty', got {mode!r}")
        self.mode = mode
        self.weights = {t: float(weights[t]) for t in tasks}
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(())) for t in tasks} if mode == "uncertainty" else {}
        )

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        for task, loss in losses.items():
            term = self.weights[task] * loss.float()
            if self.mode == "uncertainty":
                s = self.log_vars[task]
                term = torch.exp(-s) * term + s
            terms.append(term)
        return torch.stack(terms).sum()

    def effective_weights(self) -> dict[str, float]:
        """Current weight of each task's loss."""
        if self.mode == "fixed":
            return dict(self.weights)
        return {t: w * float(torch.exp(-self.log_vars[t].detach())) for t, w in self.weights.items()}
