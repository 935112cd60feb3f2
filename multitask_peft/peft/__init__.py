"""PEFT methods. Each is a registered config dataclass; `METHODS.names()` lists them.

Families (V-PEFT survey): reparameterisation (lora, dora, fact), addition (houlsby, pfeiffer, adaptformer,
convpass, vpt), partial (bitfit, norm, ssf), and the baselines linear_probe and full.
"""

from .adapters import AdaptFormer, Convpass, Houlsby, Pfeiffer
from .base import METHODS, PeftConfig, register_method
from .baselines import FullFineTune, LinearProbe
from .fact import FacT
from .lora import DoRA, LoRA
from .partial import SSF, BitFit, NormTuning
from .prompts import VPT


def from_dict(data: dict) -> PeftConfig:
    """A method config from `{"method": name, ...options}` (strict: unknown options are errors)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"a PEFT method entry needs a 'method' key (one of {METHODS.names()}), got {data!r}")
    options = {k: v for k, v in data.items() if k != "method"}
    return METHODS.get(data["method"]).from_dict(options)


__all__ = [
    "METHODS",
    "AdaptFormer",
    "BitFit",
    "Convpass",
    "DoRA",
    "FacT",
    "FullFineTune",
    "Houlsby",
    "LinearProbe",
    "LoRA",
    "NormTuning",
    "PeftConfig",
    "Pfeiffer",
    "SSF",
    "VPT",
    "from_dict",
    "register_method",
]
