"""A LoRA / DoRA task written as an HF PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`).

`PeftModel.from_pretrained(timm_model, path)` loads what `write_peft_task` writes, with a timm model of the task's
architecture and backbone weights; the mapping of tensors and options is `peft_format`'s (which reads it back).
The safetensors metadata records the task and its backbone fingerprint (PEFT ignores it; `read_peft_task` checks it).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from .peft.base import PeftConfig
from .peft_format import (
    METHODS_PEFT_HOLDS,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    PREFIX,
    check_module,
    classifier_name,
    saved_module_covers,
)
from .task_io import _atomic_write

if TYPE_CHECKING:
    from .backbone import BackboneHost
    from .model import MultiTaskModel


def write_peft_task(model: MultiTaskModel, name: str, path: str | os.PathLike) -> None:
    """Write task `name` as an HF PEFT LoRA / DoRA adapter into folder `path`, for
    `PeftModel.from_pretrained(timm_model, path)` with a timm model of the same architecture and weights.

    The head goes into `modules_to_save` as timm's classifier when it is a linear classification head (create the
    timm model with `num_classes` equal to its classes); any other head is left out, with a warning. Several
    LoRA configs in one task become `rank_pattern` / `alpha_pattern` entries; a per-slice qkv LoRA
    (`qkv_slices`) becomes one LoRA of the fused matrix with block factors, rank `r * len(qkv_slices)`.

    Raises:
        ValueError: The task uses a method other than lora / dora (named), mixes them, or adapts a module PEFT's
            LoRA treats differently (a grouped or dilated convolution).
    """
    task = model.task(name)
    host = model.backbone
    methods = list(task.peft.values())
    others = [m.config.method for m in methods if m.config.method not in METHODS_PEFT_HOLDS]
    if others or not methods:
        uses = f"uses {', '.join(others)}" if others else "has no PEFT modules (head only)"
        raise ValueError(
            f"task {name!r} {uses}, which HF PEFT's LoRA format cannot hold; exportable: tasks using only "
            f"{' or '.join(METHODS_PEFT_HOLDS)}"
        )
    if len({m.config.method for m in methods}) > 1:
        raise ValueError(f"task {name!r} mixes lora and dora; a PEFT adapter is all LoRA or all DoRA (use_dora)")
    use_rslora = all(m.config.use_rslora for m in methods)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for method in methods:
        for module_name, adapter in method.adapters().items():
            module = host.module(module_name)
            check_module(module_name, module)
            a, b, scale, magnitude = _peft_factors(adapter, module)
            ranks[module_name] = a.shape[0], _alpha(method.config, a.shape[0], scale, use_rslora)
            key = PREFIX + module_name
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, b
            if magnitude is not None:
                state[f"{key}.lora_magnitude_vector"] = magnitude
    modules_to_save = _classifier_state(model, name, set(ranks), state)
    r, alpha = max(ranks.values(), key=list(ranks.values()).count)  # the most common (r, alpha)
    module_class = type(host.model)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": module_class.__name__, "parent_library": module_class.__module__},
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): v[0] for n, v in ranks.items() if v[0] != r},
        "alpha_pattern": {re.escape(n): v[1] for n, v in ranks.items() if v[1] != alpha},
        "target_modules": _target_modules(methods, sorted(ranks, key=host.call_order), modules_to_save, host),
        "lora_dropout": max(m.config.dropout for m in methods),
        "use_rslora": use_rslora,
        "use_dora": methods[0].config.method == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "lora_bias": False,
    }
    metadata = {"format": "pt", "task": name, "backbone_fingerprint": host.fingerprint}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / PEFT_WEIGHTS_NAME, lambda f: save_file(state, f, metadata=metadata))
    _atomic_write(out / PEFT_CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))


def _peft_factors(
    adapter: nn.Module, module: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """(lora_A, lora_B, scale, magnitude or None) in PEFT's shapes for one adapted module. Per-slice factors of a
    fused qkv become one pair: A stacked (k r, in), B block-placed (out, k r): `B A` is the same update."""
    lowrank = getattr(adapter, "lowrank", adapter)  # (a DoRA adapter holds a LoRA one)
    parts = lowrank.factors()  # [(a (r, fan_in), b (rows, r), first output row)]
    a = torch.cat([pa for pa, _, _ in parts])  # (R, fan_in)
    out = module.weight.shape[0]
    b = a.new_zeros(out, a.shape[0])  # (out, R)
    offset = 0
    for pa, pb, row in parts:
        b[row : row + pb.shape[0], offset : offset + pa.shape[0]] = pb
        offset += pa.shape[0]
    magnitude = getattr(adapter, "dora_magnitude", None)
    if isinstance(module, nn.Conv2d):
        a = a.reshape(a.shape[0], *module.weight.shape[1:])  # (R, in, kh, kw)
        b = b.reshape(out, -1, 1, 1)  # (out, R, 1, 1)
        magnitude = None if magnitude is None else magnitude.reshape(1, out, 1, 1)
    return a.detach().clone(), b.detach(), lowrank.scale, None if magnitude is None else magnitude.detach().clone()


def _alpha(config: PeftConfig, rank: int, scale: float, use_rslora: bool) -> float:
    """PEFT's lora_alpha giving `scale` at `rank` (the config's own alpha where it is that)."""
    if rank == config.r and config.use_rslora == use_rslora:
        return config.r if config.alpha is None else config.alpha
    return scale * (rank**0.5 if use_rslora else rank)


def _classifier_state(
    model: MultiTaskModel, name: str, adapted: set[str], state: dict[str, torch.Tensor]
) -> list[str] | None:
    """Put the task's head into `state` as timm's classifier if it is a linear classification head; the
    `modules_to_save` entry that says so, or None (the head is left out, with a warning saying why)."""
    task, host = model.task(name), model.backbone
    classifier = classifier_name(host)
    linear = getattr(task.head, "classifier", None)
    why = None
    if task.head_config.head_type != "classification" or not isinstance(linear, nn.Linear):
        why = f"it is a {task.head_config.head_type} head, not a linear classification head"
    elif classifier is None:
        why = f"{host.arch} has no single classifier module in timm (pretrained_cfg['classifier'])"
    elif any(saved_module_covers(classifier, n) for n in adapted):
        why = f"PEFT would not adapt the modules under {classifier!r} then"
    if why is not None:
        warnings.warn(f"task {name!r}: the head is not written to the PEFT adapter: {why}", stacklevel=3)
        return None
    state[f"{PREFIX}{classifier}.weight"] = linear.weight
    state[f"{PREFIX}{classifier}.bias"] = linear.bias
    return [classifier]


def _target_modules(
    methods: Sequence[nn.Module], adapted: list[str], modules_to_save: list[str] | None, host: BackboneHost
) -> str | list[str]:
    """The task's own `targets` where PEFT's matching selects exactly the adapted modules with them, else the
    adapted modules' full names."""
    targets = [m.config.targets for m in methods]
    candidates: list[str | list[str]] = []
    if all(isinstance(t, tuple) for t in targets):
        candidates.append(list(dict.fromkeys(p for t in targets for p in t)))
    elif len(targets) == 1 and isinstance(targets[0], str):
        candidates.append(targets[0])
    names = [n for n in host.module_names() if not any(saved_module_covers(s, n) for s in modules_to_save or ())]
    for candidate in candidates:
        if isinstance(candidate, str):
            selected = {n for n in names if re.fullmatch(candidate, n)}
        else:
            selected = {n for n in names if n in candidate or any(n.endswith(f".{p}") for p in candidate)}
        if selected == set(adapted):
            return candidate
    return adapted
