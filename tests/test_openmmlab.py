"""OpenMMLab integration: mmdet / mmseg heads as our task heads, `PEFTBackbone` in mmengine's runner, and the
pieces that do not need OpenMMLab (embedding head, head swap on load, config validation)."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.integrations import require_openmmlab
from multitask_peft.outputs import decode_outputs

try:
    require_openmmlab()
    MISSING = ""
except ImportError as e:  # the reason every `openmmlab` test is skipped with
    if os.environ.get("MTPEFT_REQUIRE_OPENMMLAB") == "1":  # CI installed the extra: a skip would hide a failure
        raise
    MISSING = str(e)


def needs_openmmlab(test: Any) -> Any:
    """Mark a test `openmmlab` and skip it, saying why, when the extra does not import."""
    skip = pytest.mark.skipif(bool(MISSING), reason=f"OpenMMLab extra unavailable: {MISSING}")
    return pytest.mark.openmmlab(skip(test))


SIZE = 64

RETINA = dict(
    type="RetinaHead",
    num_classes=3,
    stacked_convs=1,
    feat_channels=16,
    anchor_generator=dict(
        type="AnchorGenerator", octave_base_scale=4, scales_per_octave=2, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32]
    ),
    bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
    loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", loss_weight=1.0),
)
RETINA_TRAIN = dict(
    assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
    sampler=dict(type="PseudoSampler"),
    allowed_border=-1,
    pos_weight=-1,
    debug=False,
)
RETINA_TEST = dict(nms_pre=200, min_bbox_size=0, score_thr=0.0, nms=dict(type="nms", iou_threshold=0.5), max_per_img=20)
UPER = dict(type="UPerHead", num_classes=4, channels=16, pool_scales=(1, 2, 3), dropout_ratio=0.0, align_corners=False)


def det_head(**overrides: Any) -> mtp.tasks.MMDetHead:
    options = dict(head=RETINA, train_cfg=RETINA_TRAIN, test_cfg=RETINA_TEST, channels=16, strides=(8, 16, 32))
    return mtp.tasks.MMDetHead(**(options | overrides))


def seg_head(**overrides: Any) -> mtp.tasks.MMSegHead:
    return mtp.tasks.MMSegHead(**(dict(head=UPER, channels=16, strides=(4, 8, 16, 32)) | overrides))


def targets(n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Detection targets (1-3 boxes per image) and segmentation masks (those boxes painted with their labels)."""
    g = torch.Generator().manual_seed(seed)
    boxes, masks = [], torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    for i in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.randint(0, SIZE // 2, (k, 2), generator=g).float()
        wh = torch.randint(12, SIZE // 2, (k, 2), generator=g).float()
        labels = torch.randint(0, 3, (k,), generator=g)
        box = torch.cat([xy, (xy + wh).clamp(max=SIZE)], dim=1)
        for (x0, y0, x1, y1), label in zip(box.long().tolist(), labels.tolist()):
            masks[i, y0:y1, x0:x1] = label + 1
        boxes.append({"boxes": box, "labels": labels})
    return boxes, masks


# --- without OpenMMLab ---------------------------------------------------------------------------------------------


def test_configs_validate_and_round_trip() -> None:
    for config in (det_head(), seg_head(class_names=("bg", "a", "b", "c"))):
        again = type(config).from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict()
    assert mtp.tasks.MMDetHead.output_kind == "detection" and mtp.tasks.MMSegHead.output_kind == "segmentation"
    with pytest.raises(ValueError, match="RetinaHead"):
        mtp.tasks.MMDetHead(head={"num_classes": 3})  # no type
    with pytest.raises(ValueError, match="num_classes"):
        mtp.tasks.MMDetHead(head={"type": "RetinaHead"})
    with pytest.raises(ValueError, match="ignore_index"):
        seg_head(head=UPER | {"ignore_index": 2})
    with pytest.raises(ValueError, match="strides"):
        seg_head(strides=(8, 4))
    with pytest.raises(ValueError, match="class_names"):
        det_head(class_names=("a",))


def test_embedding_head_and_head_swap_on_load(tmp_path: Path) -> None:
    model, size = make_model("vit")
    model.add_task("feat", mtp.tasks.Embedding(), mtp.peft.LoRA(r=4))
    randomize(model.task("feat"))
    images = torch.randn(3, 3, size, size)
    emb = model.predict(images, "feat")["feat"]
    assert len(emb) == 3 and torch.allclose(emb[0]["embedding"].norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="no loss"):
        model.task("feat").head.loss(torch.zeros(1), None)
    model.save_task("feat", tmp_path / "feat")

    # the saved PEFT modules under a new head: same adapted features, fresh head
    other, _ = make_model("vit")
    task = other.load_task(tmp_path / "feat", "cls", head=mtp.tasks.Classification(num_classes=5))
    assert task.head_config == mtp.tasks.Classification(num_classes=5)
    ref = model.forward_features(images, [model.slot("feat")] * 3).pooled
    got = other.forward_features(images, [other.slot("cls")] * 3).pooled
    torch.testing.assert_close(got, ref)
    assert other.predict(images, "cls")["cls"][0]["logits"].shape == (5,)


def test_missing_or_mismatched_extra_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "mmcv", None)  # not installed
    with pytest.raises(ImportError, match="not installed.*install_openmmlab.sh"):
        require_openmmlab()

    mmcv = types.ModuleType("mmcv")
    mmcv.__version__ = "2.1.0"
    build = types.ModuleType("mmcv._mtpeft_build")
    build.TORCH_VERSION = "2.0.0+old"
    monkeypatch.setitem(sys.modules, "mmcv", mmcv)
    monkeypatch.setitem(sys.modules, "mmcv._mtpeft_build", build)
    monkeypatch.setitem(sys.modules, "mmcv._ext", None)  # ops built for another torch do not load
    with pytest.raises(ImportError, match=r"compiled for torch 2\.0\.0\+old but torch .* is installed"):
        require_openmmlab()
    mmcv.__version__ = "2.2.0"
    with pytest.raises(ImportError, match="mmcv 2.2.0 is installed"):
        require_openmmlab()


# --- with OpenMMLab ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_model() -> mtp.MultiTaskModel:
    model, size = make_model("vit")
    model.add_task("det", det_head(), mtp.peft.LoRA(r=4))
    model.add_task("seg", seg_head(), mtp.peft.Pfeiffer(dim=6))
    model.add_task("cls", mtp.tasks.Classification(num_classes=3), mtp.peft.SSF())
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), std=0.05, seed=k)
    return model.eval()


@needs_openmmlab
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_heads_build_on_both_backbones(kind: str) -> None:
    model, size = make_model(kind)
    strides = (4, 8, 16, 32) if kind == "vit" else tuple(r for _, r in model.feature_info.levels if r >= 4)
    model.add_task("seg", seg_head(strides=strides), mtp.peft.LoRA(r=2))
    model.add_task("det", det_head(), mtp.peft.LoRA(r=2))
    fcn = dict(type="FCNHead", num_classes=4, channels=16, num_convs=1)  # one input: the finest level
    model.add_task("fcn", seg_head(head=fcn, strides=strides), mtp.peft.LoRA(r=2))
    out = model.predict(torch.randn(2, 3, size, size), ["seg", "det", "fcn"])
    assert out["seg"][0]["mask"].shape == out["fcn"][1]["mask"].shape == (size, size)
    assert out["det"][0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="prior strides"):
        model.add_task("bad", det_head(strides=(8, 16, 32, 64)))


@needs_openmmlab
def test_mixed_batch_equals_separate_runs(mm_model: mtp.MultiTaskModel) -> None:
    model = mm_model
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    wanted = [["det", "seg"], ["seg"], ["det", "cls"], ["cls", "seg", "det"]]
    mixed = model.predict_each(images, wanted)
    for i, names in enumerate(wanted):
        for name in names:
            alone = model.predict(images[i : i + 1], name)[name][0]
            got = mixed[i][name]
            if name == "seg":
                assert torch.equal(got["mask"], alone["mask"])
            elif name == "det":
                assert len(got["boxes"]) == len(alone["boxes"]) > 0
                torch.testing.assert_close(got["scores"], alone["scores"], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got["boxes"], alone["boxes"], atol=1e-3, rtol=1e-4)
                assert torch.equal(got["labels"], alone["labels"])
            else:
                torch.testing.assert_close(got["logits"], alone["logits"], atol=1e-5, rtol=1e-4)
    # routed forward: one batch with rows of every task = each task's rows run alone
    slots = torch.tensor([model.slot(t) for t in ("det", "seg", "det", "seg")])
    routed = model(images, slots)
    rows, seg_out = routed["seg"]
    alone = model(images[rows], [model.slot("seg")] * len(rows))["seg"][1]
    torch.testing.assert_close(seg_out, alone, atol=1e-5, rtol=1e-4)


@needs_openmmlab
@pytest.mark.parametrize("name", ["det", "seg"])
def test_one_training_step_reduces_the_loss(mm_model: mtp.MultiTaskModel, name: str) -> None:
    model = copy.deepcopy(mm_model).train()
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    boxes, masks = targets(4)
    target = boxes if name == "det" else masks
    params = list(model.trainable_parameters(name))
    optimizer = torch.optim.SGD(params, lr=0.05)
    slots = [model.slot(name)] * 4
    head = model.task(name).head

    def loss() -> torch.Tensor:
        return head.loss(model(images, slots)[name][1], target)

    before = loss()
    assert torch.isfinite(before) and before > 0
    optimizer.zero_grad()
    before.backward()
    peft_grads = [p.grad for p in model.task(name).peft.parameters() if p.requires_grad]
    assert peft_grads and all(g is not None and g.abs().sum() > 0 for g in peft_grads)
    assert all(p.grad is None for p in model.backbone.parameters())
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before.detach(), (float(before), float(after))


@needs_openmmlab
def test_trainer_evaluate_export_and_save(mm_model: mtp.MultiTaskModel, tmp_path: Path) -> None:
    """Our trainer and metrics take the OpenMMLab heads like ours; the segmentation one exports to ONNX; tasks
    with them save and load."""
    from multitask_peft.tasks import evaluate
    from multitask_peft.training import TaskData, TrainConfig, Trainer

    model = copy.deepcopy(mm_model)
    boxes, masks = targets(8, seed=1)
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    det_data = list(zip(images, boxes))
    seg_data = list(zip(images, masks))
    config = TrainConfig(steps=3, batch_size=4, lr=1e-3, checkpoint_every=100, tensorboard=False, progress=False)
    result = Trainer(model, {"det": TaskData(det_data), "seg": TaskData(seg_data)}, config, tmp_path / "run").fit()
    assert result["step"] == 3 and all(np.isfinite(v) for v in result["losses"].values())
    assert {"map50"} <= set(evaluate(model, "det", det_data)) and "miou" in evaluate(model, "seg", seg_data)

    for name in ("det", "seg"):
        model.save_task(name, tmp_path / name)
    other, _ = make_model("vit")
    for name in ("det", "seg"):
        other.load_task(tmp_path / name)
    model.eval()
    ref = model.predict(images[:2], ["det", "seg"])
    got = other.predict(images[:2], ["det", "seg"])
    assert torch.equal(ref["seg"][1]["mask"], got["seg"][1]["mask"])
    torch.testing.assert_close(ref["det"][0]["boxes"], got["det"][0]["boxes"])

    pytest.importorskip("onnxruntime")
    path = mtp.export_onnx(model, tmp_path / "seg.onnx", tasks=["seg", "cls"], image_size=SIZE)  # checks parity
    runner = mtp.OnnxRunner(path)
    out = runner.predict(images[:2].numpy(), tasks=["seg"])
    assert (torch.as_tensor(out["seg"][0]["mask"]) == ref["seg"][0]["mask"]).float().mean() > 0.99
    path = mtp.export_onnx(model, tmp_path / "det.onnx", tasks=["det"], image_size=SIZE)
    out = mtp.OnnxRunner(path).predict(images[:2].numpy(), tasks=["det"])["det"]
    for got, expected in zip(out, ref["det"], strict=True):
        assert len(got["scores"]) == len(expected["scores"]) > 0
        assert np.allclose(np.asarray(got["boxes"]), expected["boxes"].numpy(), atol=1e-3)
        assert np.array_equal(np.asarray(got["labels"]), expected["labels"].numpy())


@needs_openmmlab
@pytest.mark.parametrize("head", ["RetinaHead", "FCOSHead"])
def test_mmdet_export_form_equals_predict_by_feat(head: str) -> None:
    """The traceable post-processing that ONNX export uses gives mmdet's own detections (FCOS: with centerness),
    padded to the same K as the eager tensor form (mmdet's `predict_by_feat`)."""
    fcos = dict(type="FCOSHead", num_classes=3, stacked_convs=1, feat_channels=16, strides=[8, 16, 32],
                regress_ranges=((-1, 16), (16, 32), (32, 1e8)), norm_cfg=dict(type="GN", num_groups=4))  # fmt: skip
    config = det_head() if head == "RetinaHead" else det_head(head=fcos, train_cfg=None)
    model, _ = make_model("cnn")
    model.add_task("det", config, mtp.peft.LoRA(r=2))
    randomize(model.task("det"), std=0.05)
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(3, 3, SIZE, SIZE), [model.slot("det")] * 3)["det"][1]
        task_head = model.task("det").head
        eager = task_head.tensor_outputs(outputs, (SIZE, SIZE))  # predict_by_feat, padded
        expected = decode_outputs(config, task_head, outputs, (SIZE, SIZE))
        got = task_head.export_outputs(outputs, (SIZE, SIZE))  # what the graph holds
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in eager.items()}  # the same K
    assert sum(len(e["scores"]) for e in expected) > 0
    for i, e in enumerate(expected):
        n = int(got["num_detections"][i])
        assert n == len(e["scores"])
        torch.testing.assert_close(got["scores"][i, :n], e["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["boxes"][i, :n], e["boxes"], atol=1e-3, rtol=1e-4)
        assert torch.equal(got["labels"][i, :n], e["labels"])


@needs_openmmlab
def test_served_like_our_heads(mm_model: mtp.MultiTaskModel, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from PIL import Image
    from test_serving import LiveServer

    from multitask_peft import serving

    for name in ("det", "seg"):
        mm_model.save_task(name, tmp_path / name)
    model, _ = make_model("vit")
    store = serving.AdapterStore(model, tmp_path)
    store.scan()
    backend = serving.TorchBackend(model, store, serving.Preprocess((SIZE, SIZE), (0.5,) * 3, (0.5,) * 3), "cpu")
    array = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    image = (torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.5
    expected = mm_model.predict(image, ["det", "seg"])
    with LiveServer(serving.Engine(backend, serving.EngineConfig())) as server, serving.Client(server.url) as client:
        out = client.predict(buffer.getvalue(), ["det", "seg"], mask_format="list")["results"]
    assert np.array_equal(np.array(out["seg"]["mask"]), expected["seg"][0]["mask"].numpy())
    assert np.allclose(
        out["det"]["scores"], expected["det"][0]["scores"].numpy()[: len(out["det"]["scores"])], atol=1e-4
    )


@needs_openmmlab
def test_peft_backbone_trains_in_mmengine_runner(tmp_path: Path) -> None:
    """An mmdet RetinaNet config on `PEFTBackbone` (LoRA on a tiny ViT) trains a few iterations on MultiFashion's COCO
    split with mmengine's runner; only the PEFT modules, the neck and the head change; the saved PEFT part loads
    into our model as a task."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from safetensors.torch import save_file

    from multitask_peft.cli import main as cli_main
    from multitask_peft.integrations.openmmlab import PEFTBackbone
    from multitask_peft.tasks.data import fashion_mnist as multifashion

    if not (multifashion.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist")
    data = tmp_path / "multifashion"
    argv = ["data", "multifashion", str(data), "--num-scenes", "8", "2", "2", "--num-crops", "1", "1", "1"]
    cli_main([*argv, "--image-size", "64", "--format", "png", "--workers", "1", "--quiet"])
    weights = tmp_path / "test_vit.safetensors"  # one set of frozen weights for the runner's model and ours
    torch.manual_seed(0)
    save_file(mtp.MultiTaskModel.from_timm("test_vit", img_size=64).backbone.model.state_dict(), weights)

    backbone = dict(
        type="PEFTBackbone",
        arch="test_vit",
        pretrained=str(weights),
        peft=[dict(method="lora", r=4, targets=["qkv", "proj"])],
        out_strides=(8, 16, 32),
        task="garments",
        timm_kwargs=dict(img_size=64),
    )
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(64, 64), keep_ratio=False),
        dict(type="PackDetInputs"),
    ]
    cfg = Config(
        dict(
            default_scope="mmdet",
            custom_imports=dict(imports=["multitask_peft.integrations.openmmlab"], allow_failed_imports=False),
            model=dict(
                type="RetinaNet",
                data_preprocessor=dict(type="DetDataPreprocessor", mean=[127.5] * 3, std=[127.5] * 3, bgr_to_rgb=True),
                backbone=backbone,
                neck=dict(type="FPN", in_channels=[64, 64, 64], out_channels=32, num_outs=3),
                bbox_head=RETINA | dict(num_classes=10, in_channels=32, feat_channels=32),
                train_cfg=RETINA_TRAIN,
                test_cfg=RETINA_TEST,
            ),
            train_dataloader=dict(
                batch_size=4,
                num_workers=0,
                sampler=dict(type="DefaultSampler", shuffle=True),
                dataset=dict(
                    type="CocoDataset",
                    data_root=str(data / "detection"),
                    ann_file="train.json",
                    data_prefix=dict(img="train/images/"),
                    metainfo=dict(classes=multifashion.CLASSES),
                    pipeline=pipeline,
                ),
            ),
            train_cfg=dict(type="IterBasedTrainLoop", max_iters=3),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4)),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=100)),
            custom_hooks=[dict(type="SavePEFTTaskHook")],
            work_dir=str(tmp_path / "work"),
            log_level="WARNING",
        )
    )
    runner = Runner.from_cfg(cfg)
    assert isinstance(runner.model.backbone, PEFTBackbone)
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    after = runner.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    peft_prefix = "backbone.model.task_modules.garments.peft."
    assert any(k.startswith(peft_prefix) for k in changed)
    assert any(k.startswith("bbox_head.") for k in changed)
    frozen = [k for k in changed if not k.startswith((peft_prefix, "neck.", "bbox_head."))]
    assert not frozen, f"frozen tensors changed: {frozen[:5]}"

    # the PEFT part, saved by the hook, in our model as a task (a new classification head on it)
    ours = mtp.MultiTaskModel.from_timm("test_vit", pretrained=weights, img_size=64)
    task = ours.load_task(tmp_path / "work" / "peft_tasks" / "garments", head=mtp.tasks.Classification(num_classes=10))
    trained = runner.model.backbone.model.task("garments").peft.state_dict()
    assert task.peft.state_dict().keys() == trained.keys()
    assert all(torch.equal(task.peft.state_dict()[k], trained[k]) for k in trained)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = runner.model.backbone.eval()(images)[1]  # stride 16: the ViT map itself
        mine = ours.forward_features(images, [ours.slot("garments")] * 2).maps[0]
    torch.testing.assert_close(mine, theirs)

    # and back: a PEFTBackbone that starts from the saved task gives the trained backbone's maps
    again = PEFTBackbone(**{k: v for k, v in backbone.items() if k not in ("type", "peft")},
                         load_from=tmp_path / "work" / "peft_tasks" / "garments").eval()  # fmt: skip
    with torch.no_grad():
        for got, expected in zip(again(images), runner.model.backbone(images), strict=True):
            torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="differs from the recipe"):
        PEFTBackbone(**{k: v for k, v in backbone.items() if k != "type"} | {"peft": [dict(method="ssf")]},
                     load_from=tmp_path / "work" / "peft_tasks" / "garments")  # fmt: skip


@needs_openmmlab
def test_heads_build_whatever_the_default_scope() -> None:
    from mmengine.registry import DefaultScope

    model, _ = make_model("vit")
    for scope in ("mmdet", "mmseg"):
        with DefaultScope.overwrite_default_scope(scope):
            model.add_task(f"seg-{scope}", seg_head())
            model.add_task(f"det-{scope}", det_head())


@needs_openmmlab
def test_peft_backbone_in_an_mmseg_encoder_decoder() -> None:
    """mmseg's registry builds `PEFTBackbone` (a CNN: its stages as the decode head's inputs); a loss step sends
    gradients to the PEFT modules and the head only."""
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    from multitask_peft.integrations.openmmlab import PEFTBackbone

    backbone = PEFTBackbone("test_efficientnet", peft=dict(method="lora", r=2), out_indices=(1, 2, 3, 4))
    assert backbone.out_channels == [24, 32, 48, 64]
    model = MODELS.build(  # under mmseg's scope even after a runner made mmdet's the default
        dict(
            _scope_="mmseg",
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[127.5] * 3),
            backbone=dict(
                type="PEFTBackbone", arch="test_efficientnet", peft=dict(method="lora", r=2), out_indices=(1, 2, 3, 4)
            ),  # fmt: skip
            decode_head=UPER | dict(in_channels=backbone.out_channels, in_index=[0, 1, 2, 3]),
        )
    )
    model.init_weights()
    model.train()
    assert not model.backbone.model.backbone.training  # frozen: eval mode whatever the runner asks
    _, masks = targets(2)
    samples = []
    for mask in masks:
        sample = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(data=mask[None])
        samples.append(sample)
    losses = model.loss(torch.randn(2, 3, SIZE, SIZE), samples)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"backbone", "decode_head"}
    frozen = [n for n, p in model.backbone.model.backbone.named_parameters() if p.grad is not None]
    assert not frozen
    peft = model.backbone.model.task("mmlab").peft.named_parameters()
    without = {n for n, p in peft if p.grad is None}
    assert without == {"lora.layers.conv_head.lora_a", "lora.layers.conv_head.lora_b"}  # past the last stage
