"""HF PEFT's LoRA / DoRA adapters for timm models (`adapter_config.json` + `adapter_model.safetensors`), as tasks.

`read_peft_task` builds a task from what `peft.get_peft_model(timm_model, LoraConfig(...)).save_pretrained(dir)`
writes; `peft_export.write_peft_task` writes a LoRA / DoRA task that `PeftModel.from_pretrained(timm_model, dir)`
loads. The maths is the same on both sides (`delta W = scale * B A`; DoRA: `m * (W + delta W) / ||W + delta W||`
per output channel), so the factors move over unchanged:

| PEFT (per adapted module `M`)                         | this project                                             |
|-------------------------------------------------------|----------------------------------------------------------|
| `base_model.model.M.lora_A.weight` (r, in[, kh, kw])  | `LoRA` / `DoRA` adapter of `M`: `lora_a` (r, in*kh*kw)   |
| `base_model.model.M.lora_B.weight` (out, r[, 1, 1])   | `lora_b` (out, r)                                        |
| `base_model.model.M.lora_magnitude_vector` (out,) or  | `dora_magnitude` (out,)                                  |
| (1, out, 1, 1) for a conv                             |                                                          |
| `r`, `lora_alpha`, `use_rslora`, `lora_dropout`       | `r`, `alpha`, `use_rslora`, `dropout` of the method      |
| `rank_pattern` / `alpha_pattern`                      | one method config per distinct (r, alpha)                |
| `use_dora`                                            | `DoRA` instead of `LoRA`                                 |
| `modules_to_save: [<timm classifier>]`                | a linear `Classification` head (`classifier` weights)    |

Modules: `nn.Linear` (a ViT's fused `qkv` is adapted as one matrix, as PEFT does) and `nn.Conv2d` with one group,
no dilation and zero padding (PEFT's `lora_A` is a plain convolution with the base's kernel, stride and padding:
the same as ours there; on grouped or dilated convolutions the two differ, so those are refused). Everything PEFT
can say that a task cannot hold is refused with a `ValueError` naming the field, its value and what is supported.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .heads import HEADS, HeadConfig
from .peft.base import METHODS, PeftConfig, select_targets
from .task_io import CONFIG_NAME, read_json, read_safetensors

if TYPE_CHECKING:
    from .backbone import BackboneHost
    from .model import MultiTaskModel, Task

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
METHODS_PEFT_HOLDS = ("lora", "dora")

#: PEFT LoraConfig fields read here.
_MAPPED = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "fan_in_fan_out",
    "rank_pattern", "alpha_pattern", "modules_to_save", "target_modules", "auto_mapping", "init_lora_weights",
}  # fmt: skip
#: Fields that do not change what a saved adapter computes (bookkeeping; initialisation, training or loading
#: options; which modules get adapters, which the weights file says anyway).
_IGNORED = {
    "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "exclude_modules", "layers_to_transform", "layers_pattern",
}  # fmt: skip
#: `init_lora_weights` values that leave the base model's weights alone (the others rewrite them).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_peft_folder(path: str | os.PathLike) -> bool:
    """Whether folder `path` holds an HF PEFT adapter (an `adapter_config.json` with a `peft_type`) and no task
    config of ours."""
    folder = Path(path)
    if (folder / CONFIG_NAME).is_file() or not (folder / PEFT_CONFIG_NAME).is_file():
        return False
    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "peft_type" in config


# --- import ----------------------------------------------------------------------------------------------------
def read_peft_task(
    model: MultiTaskModel,
    path: str | os.PathLike,
    name: str | None = None,
    head: HeadConfig | None = None,
    replace: bool = False,
) -> Task:
    """A task built from the HF PEFT LoRA / DoRA adapter in folder `path`, validated and loaded, not attached.

    Args:
        model: The model whose backbone the adapter was trained on (same timm architecture and weights).
        path: The folder `save_pretrained` wrote.
        name: The task's name (default: the folder's name).
        head: The task's head (new, initialised as `add_task` does). None: the adapter must carry timm's
            classifier in `modules_to_save`, which becomes a linear `Classification` head with its weights.
        replace: A task of that name may exist (see `MultiTaskModel.build_task`).

    Raises:
        ValueError: A config field or tensor this project cannot represent (named, with its value), modules the
            backbone has not, shapes that do not fit, non-finite values, no head.
    """
    folder = Path(path)
    config = _read_config(folder)
    host = model.backbone
    expected_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if expected_class and expected_class != type(host.model).__name__:
        raise ValueError(
            f"{folder}: the PEFT adapter was saved for a {expected_class} (auto_mapping.base_model_class), this "
            f"model's backbone {host.arch} is a {type(host.model).__name__}"
        )
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        pickled = " (adapter_model.bin is a pickle, not loaded here: re-save with safe_serialization=True)"
        raise ValueError(
            f"{folder}: no {PEFT_WEIGHTS_NAME}{pickled if (folder / 'adapter_model.bin').exists() else ''}"
        )
    state = read_safetensors(weights)
    saved_for = _metadata(weights).get("backbone_fingerprint")
    if saved_for is not None and saved_for != host.fingerprint:
        raise ValueError(
            f"{weights}: exported from a task of backbone {saved_for!r}, this model's backbone is "
            f"{host.fingerprint!r}; load it into a model built from the same weights"
        )
    factors, classifier = _split_state(weights, state, host, config)
    configs = _method_configs(folder, config, factors, host)
    saved_head = head is None  # (a head passed in is new; the saved classifier, if any, is not read then)
    if saved_head:
        head = _classifier_head(folder, classifier, host)
    task = model.build_task(name or folder.name, head, configs, replace=replace)
    with torch.no_grad():
        for method in task.peft.values():
            for module_name, adapter in method.adapters().items():
                _load_adapter(weights, module_name, adapter, factors[module_name])
        if saved_head:
            task.head.classifier.weight.copy_(classifier["weight"])
            task.head.classifier.bias.copy_(classifier["bias"])
    bad = [k for k, v in task.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{weights}: non-finite values in {bad[:5]}")
    return task


def _read_config(folder: Path) -> dict[str, Any]:
    """PEFT's adapter config, checked field by field against what a task can hold."""
    file = folder / PEFT_CONFIG_NAME
    missing = f"{folder}: no {PEFT_CONFIG_NAME}; an HF PEFT adapter folder holds it (save_pretrained)"
    config = read_json(file, missing)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{file}: not an HF PEFT adapter config (no peft_type)")

    def refuse(field: str, supported: str) -> NoReturn:
        raise ValueError(f"{file}: PEFT field `{field}` is {config[field]!r}; supported: {supported}")

    if config["peft_type"] != "LORA":
        refuse("peft_type", "'LORA' (LoRA, and DoRA with use_dora)")
    if config.get("bias", "none") != "none":
        refuse("bias", "'none' (a task does not train the backbone's biases through LoRA; use bitfit for that)")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        refuse(
            "init_lora_weights",
            f"{', '.join(map(repr, _PLAIN_INITS))}; this init rewrites the base weights, so the factors do not "
            "apply to the plain backbone: save the adapter with PEFT's path_initial_model_for_weight_conversion",
        )
    for field in ("r", "lora_alpha"):
        if isinstance(config.get(field), bool) or not isinstance(config.get(field), (int, float)):
            refuse(field, "a number")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            refuse(field, "a mapping of module-name patterns to numbers")
    for field, value in config.items():
        if field not in _MAPPED and field not in _IGNORED and value not in (None, False, "", [], {}):
            refuse(field, "unset: this project's LoRA / DoRA have no such option")
    return config


def _split_state(
    weights: Path, state: dict[str, torch.Tensor], host: BackboneHost, config: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The file's tensors as {module: {"lora_A" | "lora_B" | "magnitude": tensor}} and the classifier's
    {"weight", "bias"} (empty if the file has none); anything else is an error."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}
    suffixes[".lora_magnitude_vector.weight"] = "magnitude"  # (PEFT < 0.12)
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter file)")
        rest = key[len(PREFIX) :]
        suffix = next((s for s in suffixes if rest.endswith(s)), None)
        if suffix is None:
            others[rest] = tensor
        else:
            factors.setdefault(rest[: -len(suffix)], {})[suffixes[suffix]] = tensor
    saved_head = classifier_name(host)
    classifier = {k.rpartition(".")[2]: v for k, v in others.items() if k.rpartition(".")[0] == saved_head}
    extra = sorted(k for k in others if k.rpartition(".")[0] != saved_head)
    if extra or (classifier and set(classifier) != {"weight", "bias"}):
        raise ValueError(
            f"{weights}: tensors other than LoRA factors and timm's classifier ({saved_head!r}): "
            f"{extra[:5] or sorted(classifier)} (modules_to_save {config.get('modules_to_save')!r}, lora_bias "
            f"{config.get('lora_bias')!r}); supported: LoRA / DoRA factors, and modules_to_save=[{saved_head!r}]"
        )
    if not factors:
        raise ValueError(f"{weights}: no LoRA factors (lora_A / lora_B tensors)")
    unknown = sorted(set(factors) - set(host.named_targetable()))
    if unknown:
        raise ValueError(
            f"{weights}: the PEFT adapter targets modules that {host.arch} has not (or that do not run on the "
            f"batch's rows): {unknown[:5]}; was it saved for another architecture?"
        )
    dora = bool(config.get("use_dora"))
    for module_name, tensors in factors.items():
        check_module(module_name, host.module(module_name))
        needed = {"lora_A", "lora_B", "magnitude"} if dora else {"lora_A", "lora_B"}
        if set(tensors) != needed:
            raise ValueError(
                f"{weights}: module {module_name!r} has {sorted(tensors)}, expected {sorted(needed)} (use_dora {dora})"
            )
    return factors, classifier


def _method_configs(
    folder: Path, config: dict[str, Any], factors: dict[str, dict[str, torch.Tensor]], host: BackboneHost
) -> list[PeftConfig]:
    """One LoRA / DoRA config per distinct (r, alpha) of the adapted modules (`rank_pattern`, `alpha_pattern`)."""
    groups: dict[tuple[int, float], list[str]] = {}
    for module_name in sorted(factors, key=host.call_order):
        r = _pattern_value(config.get("rank_pattern") or {}, module_name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module_name, config["lora_alpha"])
        rank = factors[module_name]["lora_A"].shape[0]
        if rank != r:
            raise ValueError(
                f"{folder}: module {module_name!r} has rank {rank} in {PEFT_WEIGHTS_NAME}, its config says r={r} "
                "(r / rank_pattern)"
            )
        groups.setdefault((r, alpha), []).append(module_name)
    method = METHODS.get("dora" if config.get("use_dora") else "lora")
    options = {"dropout": config.get("lora_dropout", 0.0), "use_rslora": bool(config.get("use_rslora"))}
    target_modules = config.get("target_modules")
    compact = tuple(target_modules) if isinstance(target_modules, list) else target_modules
    configs = []
    for (r, alpha), names in groups.items():
        own = {**options, "r": r, "alpha": alpha}
        exact = len(groups) == 1 and compact and _selects_exactly(method, {**own, "targets": compact}, names, host)
        configs.append(method(**own, targets=compact if exact else tuple(names)))
    return configs


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the first key that matches
    the whole module name or a dotted suffix of it, as a regular expression."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return pattern[key]
    return default


def _selects_exactly(method: type[PeftConfig], options: dict[str, Any], names: list[str], host: BackboneHost) -> bool:
    """Whether `method(**options)` targets exactly the modules `names` on this backbone (PEFT's `target_modules`
    then carry over as they are; otherwise the task lists the adapted modules by name)."""
    try:
        return set(select_targets(method(**options), host)) == set(names)
    except (ValueError, TypeError):
        return False


def _load_adapter(weights: Path, module_name: str, adapter: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    lowrank = getattr(adapter, "lowrank", adapter)  # (a DoRA adapter holds a LoRA one)
    base = lowrank.lora_b.shape[0], lowrank.lora_a.shape[1]
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    for kind, ours in (("lora_A", lowrank.lora_a), ("lora_B", lowrank.lora_b)):
        if tensors[kind].reshape(tensors[kind].shape[0], -1).shape != ours.shape:
            raise ValueError(
                f"{weights}: module {module_name!r}: shapes {found} do not fit the module ((out, in) = {base})"
            )
        ours.copy_(tensors[kind].reshape(ours.shape))
    if "magnitude" in tensors:
        if tensors["magnitude"].numel() != adapter.dora_magnitude.numel():
            raise ValueError(f"{weights}: module {module_name!r}: magnitude {found['magnitude']} for {base[0]} outputs")
        adapter.dora_magnitude.copy_(tensors["magnitude"].reshape(-1))


def _classifier_head(folder: Path, classifier: dict[str, torch.Tensor], host: BackboneHost) -> HeadConfig:
    if not classifier:
        name = classifier_name(host)
        saved = f" or save the adapter with modules_to_save=[{name!r}]" if name else ""
        raise ValueError(
            f"{folder}: an HF PEFT adapter has no head of ours; pass head=... (e.g. "
            f"mtp.tasks.Classification(num_classes=10); `mtpeft import-peft`: --head-classes N){saved}"
        )
    weight = classifier["weight"]
    if weight.ndim != 2 or weight.shape[1] != host.layout.pooled_dim or classifier["bias"].shape != weight.shape[:1]:
        raise ValueError(
            f"{folder}: the saved classifier ({tuple(weight.shape)}) is not a linear layer on this backbone's "
            f"{host.layout.pooled_dim} pooled features; pass head=..."
        )
    return HEADS.get("classification")(num_classes=weight.shape[0])


def _metadata(weights: Path) -> dict[str, str]:
    try:
        with safe_open(weights, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a valid safetensors file ({e})") from e


# --- shared ----------------------------------------------------------------------------------------------------
def check_module(name: str, module: nn.Module) -> None:
    """Raise unless PEFT's LoRA on `module` computes what ours does: a Linear, or a Conv2d with one group, no
    dilation and zero padding (PEFT's conv `lora_A` is a dense convolution with the base's kernel, stride and
    padding, without its groups or dilation)."""
    if isinstance(module, nn.Linear):
        return
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"module {name!r} is a {type(module).__name__}; PEFT interop covers nn.Linear and nn.Conv2d")
    for attr, plain in (("groups", 1), ("dilation", (1, 1)), ("padding_mode", "zeros")):
        if getattr(module, attr) != plain:
            raise ValueError(
                f"module {name!r} is a Conv2d with {attr}={getattr(module, attr)!r}; PEFT's conv LoRA differs from "
                f"this project's there, supported: {attr}={plain!r}"
            )


def classifier_name(host: BackboneHost) -> str | None:
    """timm's name of the classifier the backbone had (`pretrained_cfg["classifier"]`), if it is one module."""
    name = (getattr(host.model, "pretrained_cfg", None) or {}).get("classifier")
    return name if isinstance(name, str) else None


def saved_module_covers(saved: str, module_name: str) -> bool:
    """PEFT's rule: a module in (or under) a `modules_to_save` entry gets no adapter."""
    return re.match(rf"(^|.*\.){re.escape(saved)}($|\..*)", module_name) is not None
