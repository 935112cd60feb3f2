"""Every registered PEFT method on a ViT and a CNN: identity init, mixed batches, gradients, merging, files."""

from __future__ import annotations

import pytest
import torch

import multitask_peft as mtp
from conftest import example_config, make_model, randomize
from multitask_peft.peft import METHODS
from multitask_peft.peft.layer import MultiAdapterLayer

METHOD_NAMES = METHODS.names()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _config_or_skip(method: str, kind: str) -> mtp.peft.PeftConfig:
    config = example_config(method, kind)
    if config is None:
        pytest.skip(f"{method} does not apply to {kind} backbones (checked in test_method_rejects_other_kind)")
    return config


def _assert_features_close(a: mtp.Features, b: mtp.Features, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.pooled, b.pooled, atol=atol, rtol=1e-5)
    for x, y in zip(a.maps, b.maps, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_identity_at_init(method: str, kind: str) -> None:
    config = _config_or_skip(method, kind)
    model, size = make_model(kind)
    model.add_task("t", mtp.tasks.Classification(num_classes=3), [config])
    x = _images(3, size)
    with torch.no_grad():
        adapted = model.forward_features(x, [0, 0, 0])
        plain = model.forward_features(x, [-1, -1, -1])
        timm_model = model.backbone.plain_copy()
        reference = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(plain.pooled, reference, atol=1e-6, rtol=0)
    if config.identity_at_init:
        _assert_features_close(adapted, plain, atol=1e-6)
    else:
        assert not torch.allclose(adapted.pooled, plain.pooled, atol=1e-4)


def _mixed_model(method: str, kind: str) -> tuple[mtp.MultiTaskModel, int, list[str]]:
    """Three randomly initialised tasks of different methods / ranks on overlapping layers."""
    model, size = make_model(kind)
    model.add_task("m", mtp.tasks.Classification(num_classes=3), [_config_or_skip(method, kind)])
    model.add_task("lora", mtp.tasks.Classification(num_classes=4), [mtp.peft.LoRA(r=2, init="gaussian")])
    model.add_task("ssf", mtp.tasks.Classification(num_classes=2), [mtp.peft.SSF(), mtp.peft.BitFit()])
    for seed, name in enumerate(model.tasks):
        randomize(model.task(name), seed=seed + 1)
    return model, size, model.tasks


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_mixed_batch_equals_separate_runs(method: str, kind: str) -> None:
    model, size, names = _mixed_model(method, kind)
    slots = [
        model.slot(names[0]),
        -1,
        model.slot(names[1]),
        model.slot(names[2]),
        model.slot(names[0]),
        -1,
        model.slot(names[2]),
        model.slot(names[1]),
    ]
    x = _images(len(slots), size)
    with torch.no_grad():
        mixed = model.forward_features(x, torch.tensor(slots))
        for i, s in enumerate(slots):
            alone = model.forward_features(x[i : i + 1], [s])
            _assert_features_close(mixed.select([i]), alone)
        # The adapted rows really differ from the plain backbone (the test can fail).
        plain = model.forward_features(x, [-1] * len(slots))
    # With autograd on, layers take their out-of-place per-segment form: the same values.
    _assert_features_close(model.forward_features(x, torch.tensor(slots)), mixed)
    changes = {  # the backbone, or the features through a side network
        s: p.first_position < model.backbone.layout.num_positions or p.side is not None for s, p in model._plans.items()
    }
    for i, s in enumerate(slots):
        differs = not torch.allclose(mixed.pooled[i], plain.pooled[i], atol=1e-4)
        assert differs == (s != -1 and changes[s]), f"row {i} slot {s}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_gradients_reach_only_the_routed_task(method: str, kind: str) -> None:
    model, size, names = _mixed_model(method, kind)
    model.train()
    routed = model.slot(names[0])
    x = _images(4, size)
    out = model(x, torch.tensor([routed, -1, routed, -1]))
    assert set(out) == {names[0]}
    rows, logits = out[names[0]]
    model.task(names[0]).head.loss(logits, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.trainable_parameters(names[0])]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    peft_grads = [p.grad for p in model.task(names[0]).peft.parameters()]
    if peft_grads:
        assert any(g is not None and g.abs().sum() > 0 for g in peft_grads), "no gradient reached the PEFT modules"
    for other in names[1:]:
        assert all(p.grad is None for p in model.trainable_parameters(other))
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merged_equals_unmerged(method: str, kind: str) -> None:
    config = _config_or_skip(method, kind)
    model, size = make_model(kind)
    model.add_task("t", mtp.tasks.Classification(num_classes=3), [config])
    randomize(model.task("t"))
    if not config.foldable:
        with pytest.raises(ValueError, match="cannot be folded"):
            model.merged_backbone("t")
        return
    merged = model.merged_backbone("t")
    assert not any(isinstance(m, MultiAdapterLayer) for m in merged.modules())  # a plain timm module
    x = _images(3, size)
    with torch.no_grad():
        expected = model.forward_features(x, [0, 0, 0]).pooled
        got = merged.forward_head(merged.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_save_remove_load_round_trip(method: str, kind: str, tmp_path) -> None:  # noqa: ANN001
    config = _config_or_skip(method, kind)
    model, size = make_model(kind)
    model.add_task("t", mtp.tasks.Classification(num_classes=3, class_names=("a", "b", "c")), [config])
    model.add_task("other", mtp.tasks.Classification(num_classes=2), [mtp.peft.LoRA(r=2)])
    randomize(model.task("t"))
    x = _images(2, size)
    with torch.no_grad():
        before = model.forward_features(x, [model.slot("t")] * 2).pooled
    state = {k: v.clone() for k, v in model.task("t").state_dict().items()}
    model.save_task("t", tmp_path / "t")
    model.remove_task("t")
    assert model.tasks == ["other"]
    task = model.load_task(tmp_path / "t")
    for k, v in task.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        after = model.forward_features(x, [model.slot("t")] * 2).pooled
    assert torch.equal(before, after)
    assert task.head_config.class_names == ("a", "b", "c")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_rejects_other_kind(method: str) -> None:
    cls = METHODS.get(method)
    for kind in ("vit", "cnn"):
        if kind in cls.kinds:
            continue
        model, _ = make_model(kind)
        with pytest.raises(ValueError, match=f"applies to .*{kind} backbone"):
            model.add_task("t", mtp.tasks.Classification(num_classes=2), [cls()])
        assert model.tasks == [] and model.backbone._wrappers == {}


VARIANTS = {
    "lora-conv-depthwise-and-3x3": ("cnn", [mtp.peft.LoRA(r=3, targets=("conv_dw", "conv_stem"))]),
    "lora-qkv-slices": ("vit", [mtp.peft.LoRA(r=2, qkv_slices=("q", "v"))]),
    "lora-patch-embedding": ("vit", [mtp.peft.LoRA(r=3, targets=("patch_embed.proj", "fc2"))]),  # batched patchify
    "lora-rslora-gaussian": ("vit", [mtp.peft.LoRA(r=4, alpha=2, use_rslora=True, init="gaussian")]),
    "dora-conv-3x3": ("cnn", [mtp.peft.DoRA(r=2, targets=("conv_stem", "conv_dw"))]),
    "fact-tt": ("vit", [mtp.peft.FacT(r=3, mode="tt")]),
    "vpt-shallow": ("vit", [mtp.peft.VPT(num_tokens=2)]),
    "recipe-lora-ssf-bitfit-norm": (
        "vit",
        [mtp.peft.LoRA(r=2), mtp.peft.SSF(), mtp.peft.BitFit(), mtp.peft.NormTuning()],
    ),
    "recipe-cnn-norm-bitfit-ssf": ("cnn", [mtp.peft.NormTuning(), mtp.peft.BitFit(), mtp.peft.SSF()]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_method_variants_mixed_and_merged(variant: str) -> None:
    """Non-default options: mixed batch equals separate runs, and merged equals unmerged where foldable."""
    kind, recipe = VARIANTS[variant]
    model, size = make_model(kind)
    model.add_task("v", mtp.tasks.Classification(num_classes=3), recipe)
    model.add_task("lora", mtp.tasks.Classification(num_classes=3), [mtp.peft.LoRA(r=2)])
    for seed, name in enumerate(model.tasks):
        randomize(model.task(name), seed=seed + 1)
    slots = [0, 1, -1, 0, 1]
    x = _images(len(slots), size)
    with torch.no_grad():
        mixed = model.forward_features(x, slots)
        for i, s in enumerate(slots):
            _assert_features_close(mixed.select([i]), model.forward_features(x[i : i + 1], [s]))
        assert not torch.allclose(mixed.pooled[0], model.forward_features(x[:1], [-1]).pooled[0], atol=1e-4)
        if all(c.foldable for c in recipe):
            merged = model.merged_backbone("v")
            got = merged.forward_head(merged.forward_features(x), pre_logits=True)
            torch.testing.assert_close(got, model.forward_features(x, [0] * len(slots)).pooled, atol=2e-5, rtol=1e-5)


def test_lora_dropout_trains_and_is_off_in_eval() -> None:
    model, size = make_model("vit")
    model.add_task("t", mtp.tasks.Classification(num_classes=3), [mtp.peft.LoRA(r=2, dropout=0.5)])
    randomize(model.task("t"))
    x = _images(2, size)
    model.train()
    a, b = model.forward_features(x, [0, 0]).pooled, model.forward_features(x, [0, 0]).pooled
    assert not torch.allclose(a, b)  # dropout active on the LoRA branch
    a.sum().backward()
    assert model.task("t").peft["lora"].layers["blocks-0-attn-qkv"].lora_a.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, [0, 0]).pooled, model.forward_features(x, [0, 0]).pooled)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model, size, _ = _mixed_model("lora", "vit")
    model.train()
    x = _images(4, size)
    slots = torch.tensor([0, 1, 2, -1])
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model.forward_features(x, slots).pooled.square().sum().backward()
        grads.append(
            [p.grad.clone() for name in model.tasks for p in model.trainable_parameters(name) if p.grad is not None]
        )
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_model_apply_reaches_every_adapter() -> None:
    """`nn.Module.apply(fn)` (weight-init utilities, OpenMMLab's runner) walks into the adapters: none may shadow
    `apply` with another signature."""
    model, _ = make_model("vit")
    for method in ("lora", "houlsby", "ssf"):
        model.add_task(method, mtp.tasks.Classification(num_classes=2), example_config(method, "vit"))
    from multitask_peft.peft.layer import LayerAdapter

    seen: set[int] = set()
    model.apply(lambda m: seen.add(id(m)))
    adapters = {id(m) for m in model.modules() if isinstance(m, LayerAdapter)}
    assert adapters and adapters <= seen


def test_prefix_refuses_methods_inside_the_attention_it_recomputes() -> None:
    model, _ = make_model("vit")
    head = mtp.tasks.Classification(num_classes=3)
    with pytest.raises(ValueError, match=r"prefix recomputes blocks\.0\.attn .*lora cannot adapt blocks\.0\.attn\.qkv"):
        model.add_task("t", head, [mtp.peft.Prefix(num_tokens=2), mtp.peft.LoRA(r=2)])
    model.add_task("ok", head, [mtp.peft.Prefix(num_tokens=2), mtp.peft.LoRA(r=2, targets=("fc1",))])
    assert model.tasks == ["ok"]
