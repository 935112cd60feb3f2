from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

import multitask_peft as mtp
from multitask_peft.peft import METHODS

# Tiny random backbones: one plain ViT, one CNN (timm's test models).
BACKBONES = {
    "vit": ("test_vit", {"img_size": 64}, 64),
    "cnn": ("test_efficientnet", {}, 64),
}

# Options that make each method small and exercise its non-default paths; methods not listed use defaults,
# so a newly registered method is tested automatically.
EXAMPLE_OPTIONS = {
    "lora": {"r": 4, "targets": ("qkv", "proj", "fc1", "fc2"), "alpha": 8},
    "dora": {"r": 2},
    "fact": {"r": 4, "mode": "tk"},
    "vpt": {"num_tokens": 3, "deep": True},
    "houlsby": {"dim": 4},
    "pfeiffer": {"dim": 6},
    "adaptformer": {"dim": 5},
    "convpass": {"dim": 4},
}
CNN_OPTIONS = {"lora": {"r": 4}}  # default CNN targets: pointwise convs and linears


def example_config(method: str, kind: str) -> mtp.peft.PeftConfig | None:
    """A config of `method` for a `kind` backbone, or None if the method does not apply to it."""
    cls = METHODS.get(method)
    if kind not in cls.kinds:
        return None
    options = (CNN_OPTIONS if kind == "cnn" else {}).get(method, EXAMPLE_OPTIONS.get(method, {}))
    return cls(**options)


def make_model(kind: str) -> tuple[mtp.MultiTaskModel, int]:
    name, kwargs, size = BACKBONES[kind]
    torch.manual_seed(0)
    return mtp.MultiTaskModel.from_timm(name, **kwargs).eval(), size


def randomize(task: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Perturb every task parameter so that no adapter is an identity (mixed-batch tests must be able to fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(params=sorted(BACKBONES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param
