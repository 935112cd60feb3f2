"""Side networks (LST): dense heads, training without autograd through the backbone, composition, ONNX."""

from __future__ import annotations

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.training import saved_activations


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _dense_model(kind: str) -> tuple[mtp.MultiTaskModel, int]:
    model, size = make_model(kind)
    model.add_task("seg", mtp.tasks.Segmentation(num_classes=3), [mtp.peft.LST()])
    model.add_task("both", mtp.tasks.Segmentation(num_classes=2), [mtp.peft.LST(reduction=4), mtp.peft.LoRA(r=2)])
    model.add_task("lora", mtp.tasks.Classification(num_classes=4), [mtp.peft.LoRA(r=2)])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 1)
    return model, size


def test_lst_changes_the_maps_dense_heads_read(kind: str) -> None:
    """Mixed batches equal rows alone in every feature map too (also with LoRA in the same task, whose adapted
    outputs the side then reads), and every LST tensor trains under a dense head."""
    model, size = _dense_model(kind)
    slots = [model.slot("seg"), -1, model.slot("both"), model.slot("lora"), model.slot("seg"), model.slot("both")]
    x = _images(len(slots), size)
    with torch.no_grad():
        mixed = model.forward_features(x, slots)
        plain = model.forward_features(x, [-1] * len(slots))
        for i, s in enumerate(slots):
            alone = model.forward_features(x[i : i + 1], [s])
            for a, b in zip(mixed.select([i]).maps, alone.maps, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    changed = [not torch.allclose(m[0], p[0], atol=1e-4) for m, p in zip(mixed.maps, plain.maps, strict=True)]
    assert any(changed)
    model.train()
    out = model(x[:2], [model.slot("seg")] * 2)
    _, raw = out["seg"]
    model.task("seg").head.loss(raw, torch.randint(0, 3, (2, size, size))).backward()
    side = model.task("seg").peft["lst"]
    assert all(p.grad is not None for p in side.parameters()), [n for n, p in side.named_parameters() if p.grad is None]
    assert all(p.grad is None for p in model.backbone.parameters())


def _saved_bytes(model: mtp.MultiTaskModel, task: str, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training forward of `task` (the activations memory)."""
    model.train()
    with saved_activations(model) as kept:
        _, logits = model(x, [model.slot(task)] * len(x))[task]
    logits.sum().backward()
    return kept["bytes"]


def test_lst_trains_without_autograd_through_the_backbone() -> None:
    """The point of side tuning: the frozen backbone's activations are not kept for a backward pass."""
    model, size = make_model("vit")
    model.add_task("lst", mtp.tasks.Classification(num_classes=3), [mtp.peft.LST()])
    model.add_task("vqt", mtp.tasks.Classification(num_classes=3), [mtp.peft.VQT()])
    model.add_task("lora", mtp.tasks.Classification(num_classes=3), [mtp.peft.LoRA(r=4)])
    x = _images(4, size)
    lst, vqt, lora = (_saved_bytes(model, t, x) for t in ("lst", "vqt", "lora"))
    assert lst * 3 < lora and vqt * 3 < lora, (lst, vqt, lora)


def test_lst_options_and_refusals() -> None:
    model, _ = make_model("vit")
    task = model.add_task(
        "two", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(targets=("blocks.2", "blocks.4"))]
    )
    side = task.peft["lst"]
    layout = model.backbone.layout
    assert [layout.parts[p].name for p in side.positions] == ["blocks.2", "blocks.4"]
    assert side.down[0].out_channels == max(8, 64 // 8)
    assert (
        model.add_task("wide", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(width=24)])
        .peft["lst"]
        .down[0]
        .out_channels
        == 24
    )
    with pytest.raises(ValueError, match="matches no unit of the backbone.*blocks.0"):
        model.add_task("bad", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(targets=("blocks.40",))])
    with pytest.raises(ValueError, match="one side method at most"):
        model.add_task("bad", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(), mtp.peft.LST()])
    with pytest.raises(ValueError, match="prompt tokens would lengthen"):
        model.add_task("bad", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(), mtp.peft.VPT(num_tokens=2)])
    with pytest.raises(ValueError, match="positive integer"):
        mtp.peft.LST(reduction=0)
    with pytest.raises(ValueError, match="`features` must be one of auto, pooled, maps, both"):
        mtp.peft.LST(features="map")
    assert mtp.peft.from_dict({"method": "lst", "reduction": 4}) == mtp.peft.LST(reduction=4)


def test_lst_feeds_what_the_head_reads(kind: str) -> None:
    """`features="auto"`: projections only onto the features the task's head reads (no untrained tensors)."""
    model, _ = make_model(kind)
    levels = len(model.backbone.layout.levels)
    cls = model.add_task("cls", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST()]).peft["lst"]
    assert cls.up_pooled is not None and len(cls.up_maps) == 0
    assert (cls.config.features, cls.config.levels) == ("pooled", None)  # (what "auto" resolved to, saved)
    seg = model.add_task("seg", mtp.tasks.Segmentation(num_classes=2), [mtp.peft.LST()]).peft["lst"]
    assert seg.up_pooled is None and 0 < len(seg.up_maps) <= levels
    assert seg.config.features == "maps" and seg.config.levels == tuple(sorted(int(k) for k in seg.up_maps))
    both = model.add_task("both", mtp.tasks.Segmentation(num_classes=2), [mtp.peft.LST(features="both")])
    assert both.peft["lst"].up_pooled is not None and len(both.peft["lst"].up_maps) == levels
    with torch.inference_mode():  # (the head probe runs under inference mode too)
        again = model.add_task("again", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST()]).peft["lst"]
    assert again.config.features == "pooled"
    with pytest.raises(ValueError, match="out of range"):
        model.add_task("bad", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST(features="maps", levels=(9,))])


def test_lst_task_files_load_under_another_head(tmp_path) -> None:  # noqa: ANN001
    """The saved config holds what "auto" resolved to, so the files rebuild the same tensors under any head."""
    model, size = make_model("vit")
    model.add_task("cls", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST()])
    randomize(model.task("cls"), seed=2)
    model.save_task("cls", tmp_path / "cls")
    x = _images(2, size)
    with torch.no_grad():
        before = model.forward_features(x, [model.slot("cls")] * 2).pooled
    task = model.load_task(tmp_path / "cls", name="seg", head=mtp.tasks.Segmentation(num_classes=3))
    assert task.peft["lst"].config.features == "pooled"
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, [model.slot("seg")] * 2).pooled, before)


def test_lst_beside_prompt_tasks_in_one_batch() -> None:
    """Rows of a VPT task run in a stream of their own (longer sequences); the side reads only its rows."""
    model, size = make_model("vit")
    model.add_task("lst", mtp.tasks.Classification(num_classes=2), [mtp.peft.LST()])
    model.add_task("vpt", mtp.tasks.Classification(num_classes=2), [mtp.peft.VPT(num_tokens=3)])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 3)
    x = _images(3, size)
    with torch.no_grad():
        got = model.predict(x, ["lst", "vpt"])
        for name in ("lst", "vpt"):
            alone = model.predict(x, [name])[name]
            for a, b in zip(got[name], alone, strict=True):
                torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)


def test_lst_dense_task_exports_to_onnx(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxruntime")
    model, size = make_model("cnn")
    model.add_task("seg", mtp.tasks.Segmentation(num_classes=3), [mtp.peft.LST()])
    model.add_task("cls", mtp.tasks.Classification(num_classes=4), [mtp.peft.LST(), mtp.peft.SSF()])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 7)
    path = mtp.export_onnx(model, tmp_path / "m.onnx", image_size=size, optimize=False)
    x = _images(3, size, seed=5)
    got = mtp.OnnxRunner(path).predict(x.numpy(), ["seg", "cls"])
    want = model.predict(x, ["seg", "cls"])
    for a, b in zip(got["cls"], want["cls"], strict=True):
        torch.testing.assert_close(torch.as_tensor(a["logits"]), b["logits"], atol=1e-4, rtol=1e-4)
    for a, b in zip(got["seg"], want["seg"], strict=True):
        assert (torch.as_tensor(a["mask"]) == b["mask"]).float().mean() > 0.999


def test_vqt_queries_read_chosen_blocks_and_feed_the_pooled_features() -> None:
    model, size = make_model("vit")
    task = model.add_task(
        "q", mtp.tasks.Classification(num_classes=2), [mtp.peft.VQT(num_tokens=2, targets="blocks\\.[01]")]
    )
    vqt = task.peft["vqt"]
    assert vqt.blocks == ["blocks.0", "blocks.1"] and vqt.vqt_queries.shape == (2, 2, 64)
    assert vqt.positions == (0, 1)  # (each block's input: the stem's output, then block 0's)
    x = _images(2, size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, [0, 0]).pooled, model.forward_features(x, [-1, -1]).pooled)
        randomize(task, seed=4)
        changed = model.forward_features(x, [0, 0])
        plain = model.forward_features(x, [-1, -1])
    assert not torch.allclose(changed.pooled, plain.pooled, atol=1e-4)
    for a, b in zip(changed.maps, plain.maps, strict=True):
        assert torch.equal(a, b)  # (the backbone itself is untouched)
    with pytest.raises(ValueError, match="vqt feeds the pooled features"):
        model.add_task("seg", mtp.tasks.Segmentation(num_classes=2), [mtp.peft.VQT()])
    cnn, _ = make_model("cnn")
    with pytest.raises(ValueError, match="applies to vit backbones"):
        cnn.add_task("q", mtp.tasks.Classification(num_classes=2), [mtp.peft.VQT()])


def test_features_read_probe() -> None:
    from multitask_peft.heads import FeatureInfo, features_read

    info = FeatureInfo(levels=((8, 4), (16, 8)), pooled_dim=12, kind="cnn")

    class Deep(torch.nn.Module):
        def forward(self, features: mtp.Features) -> torch.Tensor:
            return features.maps[1].mean(dim=(2, 3))

    class Picky(torch.nn.Module):
        def forward(self, features: mtp.Features) -> torch.Tensor:
            raise RuntimeError("needs targets")

    assert features_read(Deep(), info, (64, 64)) == (False, frozenset({1}))
    assert features_read(Picky(), info, (64, 64)) == (True, frozenset({0, 1}))  # (taken to read everything)
