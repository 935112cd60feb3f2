from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

import multitask_peft as mtp
from multitask_peft.peft import METHODS

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # read by Triton once, at import

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
    "selective": {"part": "attention", "blocks": (0,)},
    "mona": {"dim": 4},
    "lorand": {"dim": 6, "rank": 2, "scale": 0.5},
    "prefix": {"num_tokens": 3},
}
CNN_OPTIONS = {"lora": {"r": 4}, "selective": {"blocks": (0,)}}  # default CNN targets: pointwise convs and linears


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, what this machine cannot run instead of failing it: `gpu` tests without CUDA, and
    Triton on CPU tensors without the interpreter (a CUDA machine compiles the kernels for the GPU, and Triton
    decides once per process). A Triton test is a CPU one if it uses the `triton_backend` fixture without a
    `device` parameter of "cuda", or is marked `interpreter`."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (off on CUDA machines)")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        device = getattr(item, "callspec", None) and item.callspec.params.get("device")
        cpu_triton = "triton_backend" in getattr(item, "fixturenames", ()) and device != "cuda"
        if (cpu_triton or item.get_closest_marker("interpreter")) and not INTERPRETING:
            item.add_marker(no_interpreter)
