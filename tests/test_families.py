"""Every backbone family the host supports, at reduced depth / width: how it is split, mixed batches equal
row-by-row runs, gradients reach only the routed task, tasks save and load, dense heads answer in input pixels.

`FAMILIES` is the registry these tests (and the README's backbone table) run over: a timm model name, the
constructor options that make it small, its input side and the split expected (`family`: written for the class,
`chain`: the checked chain of top-level modules, `generic`: the whole model as one part).
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Attention as VitAttention
from timm.models.vision_transformer import Block

import multitask_peft as mtp
from conftest import example_config, randomize
from multitask_peft.peft import METHODS
from multitask_peft.tasks import Classification, Detection, Segmentation

FAMILIES: dict[str, tuple[dict, int, str]] = {
    "vit_base_patch16_224": (dict(img_size=64, embed_dim=64, depth=2, num_heads=2), 64, "family"),
    "deit3_small_patch16_224": (dict(img_size=64, embed_dim=64, depth=2, num_heads=2), 64, "family"),
    "vit_small_patch14_dinov2": (dict(img_size=56, embed_dim=64, depth=2, num_heads=2), 56, "family"),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=56, embed_dim=64, depth=2, num_heads=2), 56, "family"),
    "eva02_tiny_patch14_224": (
        dict(img_size=56, embed_dim=64, depth=2, num_heads=2, ref_feat_shape=(4, 4)),
        56,
        "family",
    ),
    "beit_base_patch16_224": (dict(img_size=64, embed_dim=64, depth=2, num_heads=2), 64, "family"),
    "resnet18": (dict(layers=(1, 1, 1, 1)), 64, "family"),
    "convnext_atto": (dict(depths=(1, 1, 1, 1), dims=(24, 32, 48, 64)), 64, "family"),
    "convnextv2_atto": (dict(depths=(1, 1, 1, 1), dims=(24, 32, 48, 64)), 64, "family"),
    "test_efficientnet": ({}, 64, "family"),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        64,
        "family",
    ),
    "swinv2_tiny_window8_256": (
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        64,
        "chain",
    ),
    "maxvit_tiny_tf_224": (
        dict(img_size=64, embed_dim=(24, 32, 48, 64), depths=(1, 1, 1, 1), stem_width=16, transformer_dim_head=8),
        64,
        "chain",
    ),
    "regnety_002": (dict(depth=8, w0=8, wa=8, wm=2.0, group_size=8), 64, "chain"),
    "mobilenetv3_small_100": ({}, 64, "chain"),
    "fastvit_t8": (dict(layers=(1, 1, 1, 1), embed_dims=(24, 48, 96, 192)), 64, "chain"),
    "efficientvit_b0": (
        dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(64, 96)),
        64,
        "chain",
    ),
    "caformer_s18": ({}, 64, "chain"),
    "mobilevitv2_050": ({}, 64, "chain"),
    "hgnetv2_b0": ({}, 64, "chain"),
    "levit_128s": (
        dict(
            img_size=64,
            embed_dim=(32, 48, 64),
            key_dim=8,
            num_heads=(2, 2, 2),
            depth=(1, 1, 1),
            pretrained_cfg_overlay=dict(input_size=(3, 64, 64)),
        ),
        64,
        "generic",
    ),
    "test_mambaout": ({}, 64, "generic"),
}


def build(name: str) -> tuple[mtp.MultiTaskModel, int]:
    kwargs, size, _ = FAMILIES[name]
    torch.manual_seed(0)
    return mtp.MultiTaskModel.from_timm(name, **kwargs).eval(), size


def _model_with_tasks(name: str) -> tuple[mtp.MultiTaskModel, int]:
    """A LoRA classification task, an SSF segmentation task and a BitFit detection task, randomised."""
    model, size = build(name)
    model.add_task("cls", Classification(num_classes=3), [mtp.peft.LoRA(r=2, alpha=8)])  # (past layer scales)
    model.add_task("seg", Segmentation(num_classes=4, channels=16), [mtp.peft.SSF()])
    model.add_task("det", Detection(num_classes=2, channels=16, strides=(8, 16, 32)), [mtp.peft.BitFit()])
    for seed, task in enumerate(model.tasks):
        randomize(model.task(task), std=0.05, seed=seed + 1)
    return model, size


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_split_and_plain_equivalence(family: str) -> None:
    """The split expected for the family; unadapted rows equal timm's own forward_features + forward_head."""
    model, size = build(family)
    assert model.backbone.layout.split == FAMILIES[family][2]
    x = _images(2, size)
    with torch.no_grad():
        plain = model.forward_features(x, [-1, -1])
        timm_model = model.backbone.plain_copy()
        reference = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(plain.pooled, reference, atol=1e-5, rtol=1e-5)
    assert [m.shape[1] for m in plain.maps] == [c for c, _ in model.feature_info.levels]


def test_mixed_batch_equals_rows_alone(family: str) -> None:
    model, size = _model_with_tasks(family)
    slots = [model.slot(t) for t in ("cls", "seg", "det", "cls")] + [-1]
    x = _images(len(slots), size)
    with torch.no_grad():
        mixed = model.forward_features(x, slots)
        for i, s in enumerate(slots):
            alone = model.forward_features(x[i : i + 1], [s])
            torch.testing.assert_close(mixed.pooled[i : i + 1], alone.pooled, atol=1e-4, rtol=1e-4)
            for a, b in zip(mixed.maps, alone.maps, strict=True):
                torch.testing.assert_close(a[i : i + 1], b, atol=1e-4, rtol=1e-4)
        plain = model.forward_features(x, [-1] * len(slots))
    changed = (mixed.pooled - plain.pooled).abs().amax(dim=1)
    assert changed[:-1].min() > 1e-6 and changed[-1] == 0  # every task acts (the test can fail); -1 rows are plain


def test_gradients_reach_only_the_routed_task(family: str) -> None:
    model, size = _model_with_tasks(family)
    model.train()
    x = _images(2, size)
    out = model(x, [model.slot("cls")] * 2)
    out["cls"][1].sum().backward()
    lora = [p.grad for p in model.task("cls").peft.parameters()]
    assert lora and all(g is not None for g in lora) and any(g.abs().sum() > 0 for g in lora)
    for other in ("seg", "det"):
        assert all(p.grad is None for p in model.trainable_parameters(other))
    assert all(p.grad is None for p in model.backbone.parameters())


def test_dense_heads_answer_in_input_pixels(family: str) -> None:
    """Segmentation masks at the input size; detection boxes inside the image (patch-14 maps resampled too)."""
    model, size = _model_with_tasks(family)
    x = _images(2, size)
    with torch.no_grad():
        masks = model.predict(x, "seg")["seg"]
        boxes = model.predict(x, "det")["det"]
    assert [tuple(m["mask"].shape) for m in masks] == [(size, size)] * 2
    assert len(boxes) == 2 and all(b["boxes"].shape[-1] == 4 for b in boxes)
    if len(boxes[0]["boxes"]):
        assert float(boxes[0]["boxes"].min()) >= 0 and float(boxes[0]["boxes"].max()) <= size


def test_save_and_load_round_trip(family: str, tmp_path) -> None:  # noqa: ANN001
    model, size = _model_with_tasks(family)
    x = _images(2, size)
    with torch.no_grad():
        before = model.forward_features(x, [model.slot("cls"), model.slot("seg")]).pooled
    model.save_task("cls", tmp_path / "cls")
    model.save_task("seg", tmp_path / "seg")
    model.remove_task("cls")
    model.remove_task("seg")
    model.load_task(tmp_path / "cls")
    model.load_task(tmp_path / "seg")
    with torch.no_grad():
        after = model.forward_features(x, [model.slot("cls"), model.slot("seg")]).pooled
    torch.testing.assert_close(after, before, atol=0, rtol=0)


# One model of each split in the default suite (each export takes 5-15 s on 2 cores); every family with -m slow.
ONNX_FAST = ("eva02_tiny_patch14_224", "swinv2_tiny_window8_256", "levit_128s", "test_mambaout")


@pytest.mark.parametrize(
    "name", [n if n in ONNX_FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(FAMILIES)]
)
def test_onnx_export_parity(name: str, tmp_path) -> None:  # noqa: ANN001
    """A LoRA classification and an SSF segmentation task exported as one graph: ONNX Runtime's outputs equal
    PyTorch's (`export_onnx` checks parity on random inputs and writes nothing unless it holds)."""
    model, size = build(name)
    model.add_task("cls", Classification(num_classes=3), [mtp.peft.LoRA(r=2, alpha=8)])
    model.add_task("seg", Segmentation(num_classes=4, channels=16), [mtp.peft.SSF()])
    for seed, task in enumerate(model.tasks):
        randomize(model.task(task), std=0.05, seed=seed + 1)
    path = mtp.export_onnx(model, tmp_path / "m.onnx", image_size=size)
    assert path.exists() and path.stat().st_size > 0


def test_prefix_sharing_benchmark_quick() -> None:
    """`benchmarks/prefix_sharing.py --quick` (tiny EVA-02): the one-call and per-task variants agree (the benchmark
    exits otherwise) and both are timed; speed is the benchmark's business, not a test's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_sharing.py"
    spec = importlib.util.spec_from_file_location("prefix_sharing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    assert result["family"] == "Eva" and result["split"] == "family" and result["parity_max_abs_diff"] <= 1e-4
    assert result["block_floor"] == 2.0 and all(len(t) == 2 for t in result["times_s"].values())


NEW_FAMILIES = ("eva02_tiny_patch14_224", "beit_base_patch16_224", "swinv2_tiny_window8_256", "levit_128s")


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_every_method_on_the_new_splits(name: str, method: str) -> None:
    """Each registered method on EVA-02, BEiT (family splits), Swin-V2 (chain) and LeViT (generic): a mixed batch
    equals rows alone, or the method says clearly why it cannot apply."""
    model, size = build(name)
    config = example_config(method, model.backbone.layout.kind)
    if config is None:
        pytest.skip(f"{method} does not apply to {model.backbone.layout.kind} backbones")
    if method == "vpt" and not model.backbone.layout.prompts:
        with pytest.raises(ValueError, match="cannot take prompt tokens"):
            model.add_task("m", Classification(num_classes=3), [config])
        return
    if config.method == "prefix" and not any(type(m) is VitAttention for m in model.backbone.model.modules()):
        with pytest.raises(ValueError, match="no default target modules"):  # (not timm's plain Attention)
            model.add_task("m", Classification(num_classes=3), [config])
        return
    if config.method == "vqt" and not any(type(m) is Block for m in model.backbone.model.modules()):
        with pytest.raises(ValueError, match="no default target modules"):  # (EVA's and BEiT's own blocks)
            model.add_task("m", Classification(num_classes=3), [config])
        return
    if config.method == "lst" and model.backbone.layout.split == "generic":
        with pytest.raises(ValueError, match="no units whose outputs a side network could read"):
            model.add_task("m", Classification(num_classes=3), [config])
        return
    if config.method in ("houlsby", "pfeiffer", "mona", "lorand") and model.backbone.layout.split == "generic":
        with pytest.raises(ValueError, match="no default target modules"):  # no blocks to put adapters after
            model.add_task("m", Classification(num_classes=3), [config])
        return
    model.add_task("m", Classification(num_classes=3), [config])
    randomize(model.task("m"), std=0.05)
    x = _images(3, size)
    with torch.no_grad():
        mixed = model.forward_features(x, [0, -1, 0]).pooled
        alone = torch.cat([model.forward_features(x[i : i + 1], [s]).pooled for i, s in enumerate([0, -1, 0])])
    torch.testing.assert_close(mixed, alone, atol=1e-4, rtol=1e-4)


def test_generic_host_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    from multitask_peft import layouts

    layouts._ANNOUNCED.discard("MambaOut")
    with caplog.at_level("INFO", logger="multitask_peft.layouts"):
        build("test_mambaout")
        build("test_mambaout")
    said = [r for r in caplog.records if "MambaOut has no part-by-part split" in r.getMessage()]
    assert len(said) == 1 and "prefix sharing only at the input" in said[0].getMessage()
