"""PEFT methods. Each is a registered config dataclass; `METHODS.names()` lists them.

Families (V-PEFT survey): reparameterisation (lora, dora, fact, repadapter), addition (houlsby, pfeiffer,
adaptformer, convpass, vpt, prefix, mona, lorand), side (lst, vqt), partial (bitfit, norm, ssf, selective,
difffit), and the baselines linear_probe and full.
"""

from .adapters import AdaptFormer, Convpass, Houlsby, Pfeiffer
from .base import METHODS, PeftConfig, register_method
from .baselines import FullFineTune, LinearProbe
from .fact import FacT
from .lora import DoRA, LoRA
from .lorand import LoRand
from .mona import Mona
from .partial import SSF, BitFit, NormTuning
from .prefix import Prefix
from .prompts import VPT
from .repadapter import RepAdapter
from .selective import DiffFit, Selective
from .side import LST, VQT


def from_dict(data: dict) -> PeftConfig:
    """A method config from `{"method": name, ...options}` (strict: unknown options are errors)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"a PEFT method entry needs a 'method' key (one of {METHODS.names()}), got {data!r}")
    options = {k: v for k, v in data.items() if k != "method"}
    return METHODS.get(data["method"]).from_dict(options)


def to_dict(config: PeftConfig) -> dict:
    """`{"method": name, ...options}`: the inverse of `from_dict`."""
    return {"method": config.method, **config.to_dict()}


def recipe_from_list(data: object) -> list[PeftConfig]:
    """A PEFT recipe from a list of `{"method": name, ...options}` entries (what task files and run configs hold)."""
    if not isinstance(data, list):
        raise ValueError(f"a PEFT recipe is a list of {{method: ..., options}} entries, got {data!r}")
    return [from_dict(entry) for entry in data]


def recipe_to_list(recipe: list[PeftConfig]) -> list[dict]:
    """The inverse of `recipe_from_list`."""
    return [to_dict(c) for c in recipe]


__all__ = [
    "METHODS",
    "AdaptFormer",
    "BitFit",
    "Convpass",
    "DiffFit",
    "DoRA",
    "FacT",
    "FullFineTune",
    "Houlsby",
    "LST",
    "LinearProbe",
    "LoRA",
    "LoRand",
    "Mona",
    "NormTuning",
    "PeftConfig",
    "RepAdapter",
    "Pfeiffer",
    "Prefix",
    "SSF",
    "Selective",
    "VPT",
    "VQT",
    "from_dict",
    "recipe_from_list",
    "recipe_to_list",
    "register_method",
    "to_dict",
]
