"""How differently the members of an ensemble err: `disagreement(model, ensemble, dataset)`.

The PETL study behind this project (Mai et al., ICLR 2025) finds that PETL methods tuned to similar accuracy make
*different mistakes*, which is what lets their ensemble beat its best member. One pass over a dataset
(`tasks.evaluate_tasks`: each batch one `model.predict` call, the members sharing the backbone prefix and running
once per image) measures it for classification tasks:

- `accuracy`, `ensemble_accuracy`: top-1 of each member and of the ensemble;
- `pairwise_disagreement`: per pair of members, the fraction of images where their predicted labels differ;
- `different_mistakes`: the fraction of images misclassified by at least one member but not by all;
- `all_right`, `all_wrong`: the fractions every member gets right / wrong;
- `oracle`: the fraction at least one member gets right (`all_right + different_mistakes`).

This module sits on top of the core and `tasks` (like `report`), which is why it is not in `multitask_peft.ensemble`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .ensemble import check_ensemble, combine

if TYPE_CHECKING:
    from .model import MultiTaskModel


def disagreement(
    model: MultiTaskModel,
    ensemble: str | Sequence[str],
    dataset: Any,
    mode: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy, pairwise disagreement and "different mistakes" of an ensemble's members, in one pass.

    Args:
        model: The model holding the members.
        ensemble: An ensemble of the model (its members and mode are used; its results are the model's), or a list
            of at least two classification tasks of one label space (their ensemble is combined here with `mode`).
        dataset: (image, target) pairs as `tasks.evaluate` takes them, targets class indices.
        mode: For a list of tasks, how they are combined ("mean_prob", the default, or "mean_logit"); for an
            ensemble, None or its own mode.
        batch_size, num_workers, progress: As in `tasks.evaluate`.

    Returns:
        {"members", "mode", "num_images", "accuracy": {member: top-1}, "ensemble_accuracy", "best_member",
        "gain_over_best" (ensemble minus best member top-1), "oracle", "different_mistakes", "all_right",
        "all_wrong", "pairwise_disagreement": {"a/b": fraction}, "mean_pairwise_disagreement", "metrics": the
        `evaluate_tasks` metrics of every evaluated task (and of the ensemble when it is the model's)}.
    """
    from .tasks import evaluate_tasks

    if isinstance(ensemble, str):
        ens = model.ensemble(ensemble)
        if mode is not None and mode != ens.mode:
            raise ValueError(f"ensemble {ensemble!r} combines with mode {ens.mode!r}; got mode={mode!r} (leave it out)")
        members, mode, names = list(ens.members), ens.mode, [ens.name, *ens.members]
    else:
        heads = {t: model.task(t).head_config for t in model.tasks}
        existing = {e: model.ensemble(e).members for e in model.ensembles}
        mode = "mean_prob" if mode is None else mode
        members = list(check_ensemble("disagreement", ensemble, mode, heads, existing).members)
        names = members
    kind = model.head_config(members[0]).output_kind
    if kind != "classification":
        raise ValueError(
            f"disagreement compares classification tasks (one label per image); {members[0]!r} makes {kind!r} results"
        )
    labels: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    logits: dict[str, list[torch.Tensor]] = {t: [] for t in members}
    targets: list[torch.Tensor] = []

    def collect(name: str) -> Any:
        def hook(results: Sequence[dict[str, Any]], batch_targets: Any) -> None:
            if name == names[0]:
                targets.append(torch.as_tensor(batch_targets, dtype=torch.int64).cpu().reshape(-1))  # (B,)
            labels[name].append(torch.tensor([int(r["label"]) for r in results]))  # (B,)
            if name in logits:
                logits[name].append(torch.stack([r["logits"].detach().float().cpu() for r in results]))  # (B, C)

        return hook

    metrics = evaluate_tasks(
        model, names, dataset, batch_size, num_workers, progress, on_batch={t: collect(t) for t in names}
    )
    target = torch.cat(targets)  # (N,)
    predicted = {t: torch.cat(v) for t, v in labels.items()}  # (N,) each
    if isinstance(ensemble, str):  # the model's ensemble: its own results
        predicted_ensemble = predicted[ensemble]
    else:  # a list of tasks: their ensemble combined here, as the model would
        predicted_ensemble = combine([torch.cat(logits[t]) for t in members], mode).argmax(dim=1)  # (N,)
    correct = torch.stack([predicted[t] == target for t in members])  # (K, N)
    accuracy = {t: _mean(correct[k]) for k, t in enumerate(members)}
    best = max(members, key=lambda t: accuracy[t])
    ensemble_accuracy = _mean(predicted_ensemble == target)
    pairs = {f"{a}/{b}": _mean(predicted[a] != predicted[b]) for a, b in itertools.combinations(members, 2)}
    all_right, all_wrong = correct.all(dim=0), (~correct).all(dim=0)
    return {
        "members": members,
        "mode": mode,
        "num_images": int(target.numel()),
        "accuracy": accuracy,
        "ensemble_accuracy": ensemble_accuracy,
        "best_member": best,
        "gain_over_best": ensemble_accuracy - accuracy[best],
        "oracle": _mean(correct.any(dim=0)),
        "different_mistakes": _mean(~all_right & ~all_wrong),
        "all_right": _mean(all_right),
        "all_wrong": _mean(all_wrong),
        "pairwise_disagreement": pairs,
        "mean_pairwise_disagreement": sum(pairs.values()) / len(pairs),
        "metrics": metrics,
    }


def _mean(flags: torch.Tensor) -> float:
    return float(flags.float().mean())
