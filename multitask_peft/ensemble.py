"""Ensembles: a named result that combines the results of member tasks of one label space.

An ensemble owns no parameters and no slot: its members run in the same routed pass as everything else asked for
(shared backbone prefix; a member asked for directly as well runs once), and the ensemble combines their *class
logits* (`Head.class_logits`: per image for classification, per pixel for segmentation) in one of two modes:

- `"mean_prob"`: the mean of the members' softmax probabilities. The ensemble's class logits are the log of that
  mean (log-probabilities: their softmax is the mean probability again), computed as
  `logsumexp_k(log_softmax(x_k)) - log K` so they stay finite where a probability underflows;
- `"mean_logit"`: the mean of the members' logits.

The output kind turns the combined class logits into its tensor form (`OutputKind.from_class_logits`), so an
ensemble's results have the keys of its members' (classification: "logits", "label", "score"; segmentation:
"mask") and are decoded, sent as JSON, measured and exported like a task's. Kinds without class logits (detection:
box fusion, embeddings) cannot be ensembled.

Members share a label space: the same output kind, the same number of classes, the same class names where both have
them. Members are tasks, not ensembles (list an ensemble's members instead). An ensemble folder
(`ensemble_config.json`, no weights) names its members and mode; it loads into a model holding those members.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import check_task_name
from .heads import Head, HeadConfig
from .outputs import OUTPUT_KINDS, OutputKind, Result, output_kind
from .version import __version__

ENSEMBLE_MODES = ("mean_prob", "mean_logit")
ENSEMBLE_CONFIG = "ensemble_config.json"
FORMAT = "multitask-peft-ensemble"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """An ensemble of tasks (`MultiTaskModel.add_ensemble`).

    Attributes:
        name: Its name (tasks and ensembles share one name space).
        members: Names of its member tasks (at least two, in the order given).
        mode: "mean_prob" or "mean_logit" (see the module docstring).
        head_config: Its label space: the first member's head config, with the class names of the first member
            that has them. What formats, measures and describes its results.
    """

    name: str
    members: tuple[str, ...]
    mode: str
    head_config: HeadConfig


def supports_ensembles(kind: OutputKind) -> bool:
    """Whether results of this output kind can be combined (the kind builds its tensor form from class logits)."""
    return type(kind).from_class_logits is not OutputKind.from_class_logits


def head_supports_ensembles(head: Head) -> bool:
    """Whether a head module gives class logits to combine (`Head.class_logits`)."""
    return type(head).class_logits is not Head.class_logits


def check_ensemble(
    name: object,
    members: object,
    mode: object,
    heads: Mapping[str, HeadConfig],
    ensembles: Mapping[str, Sequence[str]],
) -> Ensemble:
    """Validate an ensemble against the tasks it may combine; raises a ValueError / TypeError naming the problem.

    Args:
        name: The ensemble's name.
        members: Its member task names.
        mode: One of `ENSEMBLE_MODES`.
        heads: {task name: head config} of every task that exists.
        ensembles: {ensemble name: members} of the ensembles that exist (they cannot be members).
    """
    name = check_task_name(name)
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble {name!r}: mode must be one of {ENSEMBLE_MODES} but the value passed is {mode!r}")
    if isinstance(members, str) or not isinstance(members, Sequence) or not all(isinstance(m, str) for m in members):
        raise TypeError(f"ensemble {name!r}: members must be a list of task names, got {members!r}")
    duplicates = sorted({m for m in members if list(members).count(m) > 1})
    if duplicates:
        raise ValueError(f"ensemble {name!r}: members {duplicates} are listed more than once in {list(members)}")
    if len(members) < 2:
        raise ValueError(f"ensemble {name!r}: needs at least two member tasks, got {list(members)}")
    nested = [m for m in members if m in ensembles]
    if nested:
        flat = list(dict.fromkeys(t for m in members for t in ensembles.get(m, (m,))))
        raise ValueError(
            f"ensemble {name!r}: members {nested} are ensembles; ensembles of ensembles are not supported, "
            f"list their member tasks instead (e.g. members={flat})"
        )
    unknown = [m for m in members if m not in heads]
    if unknown:
        raise ValueError(f"ensemble {name!r}: unknown member task(s) {unknown}; tasks: {list(heads)}")
    for m in members:
        kind = output_kind(heads[m])
        if not supports_ensembles(kind):
            supported = [k for k in OUTPUT_KINDS if supports_ensembles(OUTPUT_KINDS.get(k))]
            raise ValueError(
                f"ensemble {name!r}: member {m!r} makes {kind.name!r} results, which cannot be combined; "
                f"ensembles combine {', '.join(supported)} tasks"
            )
    first = heads[members[0]]
    for m in members[1:]:
        head = heads[m]
        for what, a, b in (
            ("output kind", first.output_kind, head.output_kind),
            ("num_classes", getattr(first, "num_classes", None), getattr(head, "num_classes", None)),
        ):
            if a != b:
                raise ValueError(
                    f"ensemble {name!r}: members must share a label space, but {members[0]!r} has {what} {a!r} "
                    f"and {m!r} has {b!r}"
                )
        names_a, names_b = getattr(first, "class_names", None), getattr(head, "class_names", None)
        if names_a is not None and names_b is not None and tuple(names_a) != tuple(names_b):
            raise ValueError(
                f"ensemble {name!r}: members must share a label space, but {members[0]!r} has class_names "
                f"{list(names_a)} and {m!r} has {list(names_b)}"
            )
    return Ensemble(name, tuple(members), mode, _label_space(first, [heads[m] for m in members]))


def _label_space(first: HeadConfig, heads: Sequence[HeadConfig]) -> HeadConfig:
    """The first member's head config, carrying the class names of the first member that has them."""
    names = next((h.class_names for h in heads if getattr(h, "class_names", None) is not None), None)
    if names is None or getattr(first, "class_names", None) is not None:
        return first
    return dataclasses.replace(first, class_names=tuple(names))


def combine(logits: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """The ensemble's class logits from its members' (traceable: eager results and ONNX graphs use it).

    For each position (image, pixel) and class c, with K members and x_k their logits (class dimension 1):
    "mean_logit": mean_k x_k[c]; "mean_prob": log(mean_k softmax(x_k)[c]).

    Args:
        logits: One (N, C, ...) tensor per member.
        mode: One of `ENSEMBLE_MODES`.

    Returns:
        (N, C, ...) float32.
    """
    stacked = torch.stack([x.float() for x in logits])  # (K, N, C, ...)
    if mode == "mean_logit":
        return stacked.mean(dim=0)
    if mode == "mean_prob":
        return torch.logsumexp(stacked.log_softmax(dim=2), dim=0) - math.log(len(logits))
    raise ValueError(f"mode must be one of {ENSEMBLE_MODES} but the value passed is {mode!r}")


def tensor_form(ensemble: Ensemble, logits: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ensemble's tensor form (its output kind's) from its members' (N, C, ...) class logits, in member order."""
    return output_kind(ensemble.head_config).from_class_logits(combine(logits, ensemble.mode))


def decode(ensemble: Ensemble, logits: Sequence[torch.Tensor]) -> list[Result]:
    """One result dict per image, from its members' (N, C, ...) class logits, in member order."""
    return output_kind(ensemble.head_config).decode(tensor_form(ensemble, logits))


# --- ensemble folders ----------------------------------------------------------------------------------------------


def is_ensemble_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an ensemble folder (holds `ensemble_config.json`)."""
    return (Path(path) / ENSEMBLE_CONFIG).is_file()


def write_ensemble(path: str | os.PathLike, ensemble: Ensemble) -> None:
    """Write `ensemble_config.json` (format, members, mode; no weights) into directory `path`."""
    from .task_io import _atomic_write

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "ensemble": ensemble.name,
        "members": list(ensemble.members),
        "mode": ensemble.mode,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / ENSEMBLE_CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))


def read_ensemble(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config of the ensemble folder `path`: {"ensemble": name, "members": [...], "mode": ...}."""
    from .task_io import read_versioned_json

    holds = f"an ensemble folder holds {ENSEMBLE_CONFIG}"
    config = read_versioned_json(
        path, ENSEMBLE_CONFIG, holds, "ensemble", FORMAT, FORMAT_VERSION, ("ensemble", "members", "mode")
    )
    file = Path(path) / ENSEMBLE_CONFIG
    members = config["members"]
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ValueError(f"{file}: 'members' must be a list of task names, got {members!r}")
    return {"ensemble": config["ensemble"], "members": members, "mode": config["mode"]}
