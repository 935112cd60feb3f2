"""Visual Prompt Tuning (Jia et al., 2022): learnable tokens inserted after a ViT's class/register tokens."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import TYPE_CHECKING, ClassVar

import timm
import torch
from torch import nn

from ..config import check_positive_int, check_unit_interval
from .base import MethodModule, PeftConfig, PromptTokens, register_method

if TYPE_CHECKING:
    from ..backbone import BackboneHost


@register_method("vpt")
@dataclasses.dataclass
class VPT(PeftConfig):
    """VPT-shallow (`deep=False`: prompts enter the first block) or VPT-deep (fresh prompts before every block).

    Args:
        num_tokens: Prompt tokens per block.
        deep: One prompt set per block instead of one for the input.
        dropout: Dropout on the prompts during training.
        prompt_scale: Factor on the attention every token pays to the prompts (before the softmax renormalises;
            a bias of log(prompt_scale) on the prompt keys), in [0, 1]. 1 is VPT; 0 makes the other tokens ignore
            the prompts, which is the frozen backbone. WiSE (`MultiTaskModel.wise_task`) scales it by alpha: the
            prompts' contribution is scaled, as a weight delta is for the other methods.
    """

    onnx: ClassVar[bool] = False  # prompt tokens change the sequence length: not in the multi-task graph

    kinds: ClassVar[tuple[str, ...]] = ("vit",)
    identity_at_init: ClassVar[bool] = False

    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0
    prompt_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "num_tokens", self.num_tokens)
        check_unit_interval(self.method, "prompt_scale", self.prompt_scale)
        if self.targets is not None:
            raise ValueError(
                f"{self.method}: prompts are not placed on modules; `targets` must be None, got {self.targets!r}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: `dropout` should be in [0, 1) but the value passed is {self.dropout!r}")

    def build(self, host: BackboneHost) -> MethodModule:
        if host.layout.kind not in self.kinds:
            raise ValueError(f"{self.method} applies to vit backbones; {host.arch} is a {host.layout.kind} backbone")
        if not host.layout.prompts:
            raise ValueError(
                f"{self.method}: {host.arch} ({type(host.model).__name__}) cannot take prompt tokens: its blocks "
                "fix the token count (rotary embeddings or relative position biases) or it is hosted whole (no "
                "per-block split); prompts run on plain VisionTransformer models"
            )
        num_units = len(host.layout.parts) - 2
        dim = host.layout.levels[-1].channels
        patch = host.layout.patch_size
        return VPTModule(self, num_units if self.deep else 1, dim, patch)


class VPTModule(MethodModule, PromptTokens):
    def __init__(self, config: VPT, sets: int, dim: int, patch: int) -> None:
        super().__init__(config, {})
        self.num_tokens = config.num_tokens
        self.deep = config.deep
        self.dropout = nn.Dropout(config.dropout)
        bound = math.sqrt(6.0 / float(3 * patch * patch + dim))  # the VPT paper's Xavier-uniform bound
        self.vpt_prompts = nn.Parameter(torch.empty(sets, config.num_tokens, dim).uniform_(-bound, bound))

    def prompts(self) -> PromptTokens:
        return self

    def tokens(self, unit: int) -> torch.Tensor | None:
        if self.deep:
            return self.dropout(self.vpt_prompts[unit])  # (P, C)
        return self.dropout(self.vpt_prompts[0]) if unit == 0 else None

    def first_position(self, host: BackboneHost) -> int:
        return 1  # the input of the first block

    def attention_scale(self) -> float:
        return float(self.config.prompt_scale)

    @torch.no_grad()
    def wise_(self, alpha: float, host: BackboneHost) -> None:
        """WiSE for prompts: the attention paid to them is scaled by `alpha` (0: the frozen backbone)."""
        block = host.model.blocks[0]
        if alpha != 1.0 and "attn_mask" not in inspect.signature(block.forward).parameters:
            raise ValueError(
                f"vpt: WiSE scales the attention paid to the prompts through the blocks' `attn_mask`, which "
                f"{type(block).__module__}.{type(block).__name__} (timm {timm.__version__}) does not take; "
                "upgrade timm"
            )
        self.config = dataclasses.replace(self.config, prompt_scale=self.config.prompt_scale * alpha)
