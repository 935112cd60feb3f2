"""Our LoRA equals HF PEFT's LoRA (same frozen weights, same factors), in mixed batches too."""

from __future__ import annotations

import copy

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model, randomize

peft = pytest.importorskip("peft")


def test_lora_matches_hf_peft_mixed_batch() -> None:
    model, size = make_model("vit")
    targets = ("qkv", "proj", "fc1", "fc2")  # suffixes; both libraries also match the patch_embed.proj conv
    for name in ("a", "b"):
        model.add_task(name, mtp.tasks.Classification(num_classes=2), [mtp.peft.LoRA(r=4, alpha=8, targets=targets)])
        randomize(model.task(name), seed=len(model.tasks))
    hf = peft.get_peft_model(
        copy.deepcopy(model.backbone.plain_copy()), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    )
    hf.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for ours, theirs in (("a", "default"), ("b", "b")):
            for module_name, adapter in model.task(ours).peft["lora"].adapters().items():
                layer = hf.base_model.model.get_submodule(module_name)
                layer.lora_A[theirs].weight.copy_(adapter.lora_a.view_as(layer.lora_A[theirs].weight))
                layer.lora_B[theirs].weight.copy_(adapter.lora_b.view_as(layer.lora_B[theirs].weight))
    hf.eval()
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    slots = [0, 1, -1, 1, 0]
    names = ["default", "b", "__base__", "b", "default"]
    with torch.no_grad():
        ours = model.forward_features(x, slots).pooled
        theirs = hf.base_model.model.forward_head(_hf_features(hf, x, names), pre_logits=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[0], ours[2], atol=1e-3)  # the adapters do change the features


def _hf_features(hf: torch.nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """HF PEFT's mixed-adapter batch: `adapter_names` is honoured by the PeftModel call, not by timm's methods."""
    inner = hf.base_model.model
    original = inner.forward
    inner.forward = inner.forward_features  # the PeftModel call then returns timm's features
    try:
        return hf(x, adapter_names=names)
    finally:
        inner.forward = original
