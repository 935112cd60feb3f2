"""Semantic segmentation head: config, shapes on ViT and CNN, loss (ignore index, dice), overfit, mixed batches."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.heads import HEADS
from multitask_peft.outputs import decode_outputs
from multitask_peft.tasks.segmentation import Segmentation, soft_dice_loss

IGNORE = 255


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _scenes(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a filled square (class 1) and a disc (class 2) of distinct colours; background 0."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g) * 0.3  # (N, 3, H, W)
    targets = torch.zeros(n, size, size, dtype=torch.int64)  # (N, H, W)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    colours = {1: torch.tensor([1.5, -1.5, -1.5]), 2: torch.tensor([-1.5, -1.5, 1.5])}
    for i in range(n):
        for c, colour in colours.items():
            r = int(torch.randint(size // 8, size // 4, (1,), generator=g))
            cy, cx = torch.randint(r, size - r, (2,), generator=g).tolist()
            if c == 1:
                region = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            else:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            targets[i][region] = c
            images[i][:, region] += colour.view(3, 1)
    return images, targets


# --- config ------------------------------------------------------------------------------------------------------


def test_registered_and_round_trips_through_dict() -> None:
    assert HEADS.get("segmentation") is Segmentation
    cfg = Segmentation(num_classes=3, strides=(8, 16), dice_weight=0.5, class_names=("bg", "a", "b"))
    data = {**cfg.to_dict(), "strides": [8, 16], "class_names": ["bg", "a", "b"]}  # as JSON gives it back
    assert Segmentation.from_dict(data) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"channels": -8}, "channels"),
        ({"strides": ()}, "strides"),
        ({"strides": (8, 4)}, "strides"),
        ({"strides": (4, 4, 8)}, "strides"),
        ({"strides": (4, 12)}, "strides"),
        ({"strides": 8}, "strides"),
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"dice_weight": float("nan")}, "dice_weight"),
        ({"ignore_index": 1}, "ignore_index"),
        ({"ignore_index": 255.0}, "ignore_index"),
        ({"class_names": ("a",)}, "class_names"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Segmentation(**{"num_classes": 3, **kwargs})


def test_strides_the_cnn_does_not_offer_raise_value_error() -> None:
    model, size = make_model("cnn")  # stages at strides 2, 4, 8, 16, 32
    with pytest.raises(ValueError, match=r"include \[12, 24\].*offers feature maps at strides \[2, 4, 8, 16, 32\]"):
        model.add_task("boxes", mtp.tasks.Detection(num_classes=2, strides=(12, 24)))
    assert model.tasks == []
    model.add_task("seg", Segmentation(num_classes=2, channels=8, strides=(1, 2)))  # finer than stage 1: upsampled
    with torch.no_grad():
        _, logits = model(_images(1, size), [model.slot("seg")])["seg"]
    assert logits.shape == (1, 2, size, size)


# --- shapes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 80, 96])
def test_output_shapes(kind: str, size: int) -> None:
    model, _ = make_model(kind)
    model.add_task("seg", Segmentation(num_classes=5, channels=32), [mtp.peft.SSF()])
    x = _images(2, size)
    with torch.no_grad():
        rows, logits = model(x, [model.slot("seg")] * 2)["seg"]
    assert rows.tolist() == [0, 1]
    assert logits.shape == (2, 5, size, size) and torch.isfinite(logits).all()
    res = model.predict(x, "seg")["seg"]
    assert len(res) == 2 and set(res[0]) == {"mask"}
    assert res[0]["mask"].shape == (size, size) and res[0]["mask"].dtype == torch.int64
    assert int(res[0]["mask"].min()) >= 0 and int(res[0]["mask"].max()) < 5


def test_every_pyramid_level_reaches_the_logits(kind: str) -> None:
    model, size = make_model(kind)
    task = model.add_task("seg", Segmentation(num_classes=3, channels=16), [mtp.peft.SSF()])
    model.train()
    logits = model(_images(2, size), [0, 0])["seg"][1]
    task.head.loss(logits, torch.randint(0, 3, (2, size, size))).backward()
    no_grad = [n for n, p in task.head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert len(task.head.branches) == 4


def test_vit_strides_from_the_simple_pyramid() -> None:
    model, _ = make_model("vit")
    model.add_task("seg", Segmentation(num_classes=2, strides=(8, 16, 32, 64)))
    with torch.no_grad():
        logits = model(_images(1, 128), [0])["seg"][1]  # a 2 x 2 map at stride 64
    assert logits.shape == (1, 2, 128, 128)


def test_mask_resized_to_image_size() -> None:
    head = Segmentation(num_classes=3).build(make_model("vit")[0].feature_info)
    logits = torch.zeros(2, 3, 16, 16)
    logits[:, 2, :, 8:] = 5.0  # right half is class 2
    res = decode_outputs(head.config, head, logits, (40, 24))
    assert res[1]["mask"].shape == (40, 24) and res[1]["mask"].dtype == torch.int64
    assert (res[1]["mask"][:, 13:] == 2).all() and (res[1]["mask"][:, :11] == 0).all()  # away from the edge


# --- loss --------------------------------------------------------------------------------------------------------


def _head(dice_weight: float = 0.0, num_classes: int = 4) -> torch.nn.Module:
    info = mtp.FeatureInfo(levels=((16, 16),), pooled_dim=16, kind="vit")
    return Segmentation(num_classes=num_classes, channels=8, dice_weight=dice_weight).build(info)


def _logits_and_targets(num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, num_classes, 12, 10, generator=g)
    targets = torch.randint(0, num_classes, (2, 12, 10), generator=g)
    targets[0, :4] = IGNORE
    targets[1, :, 7:] = IGNORE
    return logits, targets


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_ignore_pixels_do_not_change_the_loss(dice_weight: float) -> None:
    head = _head(dice_weight)
    logits, targets = _logits_and_targets()
    logits.requires_grad_(True)
    loss = head.loss(logits, targets)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    ignored = (targets == IGNORE).unsqueeze(1).expand_as(logits)
    assert (logits.grad[ignored] == 0).all() and (logits.grad[~ignored] != 0).any()

    changed = logits.detach().clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 10
    torch.testing.assert_close(head.loss(changed, targets), loss.detach(), rtol=0, atol=1e-6)
    # ... while changing a labelled pixel does change it
    changed[~ignored] += torch.randn(int((~ignored).sum()))
    assert not torch.allclose(head.loss(changed, targets), loss.detach())


def test_all_ignored_gives_zero_loss_with_a_graph() -> None:
    logits = torch.randn(1, 4, 8, 8, requires_grad=True)
    loss = _head(1.0).loss(logits, torch.full((1, 8, 8), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_cross_entropy_term_matches_torch() -> None:
    logits, targets = _logits_and_targets()
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE)
    torch.testing.assert_close(_head(0.0).loss(logits, targets), expected)


def test_dice_term() -> None:
    logits, targets = _logits_and_targets()
    valid = targets != IGNORE
    ce = _head(0.0).loss(logits, targets)
    dice = soft_dice_loss(logits, targets, valid)
    torch.testing.assert_close(_head(0.7).loss(logits, targets), ce + 0.7 * dice)
    assert 0 < dice < 1

    # uniform probabilities 1/C: class c with n_c of the N labelled pixels has dice 2 n_c / (N + C n_c)
    num_classes = logits.shape[1]
    counts = torch.bincount(targets[valid], minlength=num_classes).float()
    present = counts > 0
    expected = 1 - (2 * counts / (valid.sum() + num_classes * counts))[present].mean()
    torch.testing.assert_close(soft_dice_loss(torch.zeros_like(logits), targets, valid), expected)

    # confident and right: dice loss near 0; confident and wrong: near 1
    perfect = torch.nn.functional.one_hot(targets.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2) * 50.0
    assert soft_dice_loss(perfect, targets, valid) < 1e-4
    assert soft_dice_loss(perfect.roll(1, dims=1), targets, valid) > 1 - 1e-4


def test_targets_at_another_resolution_and_bad_targets() -> None:
    head = _head()
    logits, targets = _logits_and_targets()
    assert torch.isfinite(head.loss(logits, targets[:, ::2, ::2]))  # logits resized to the targets' size
    with pytest.raises(TypeError, match="int64"):
        head.loss(logits, targets.float())
    with pytest.raises(ValueError, match="shape"):
        head.loss(logits, targets[0])
    bad = targets.clone()
    bad[0, 5, 5] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        head.loss(logits, bad)


# --- training ----------------------------------------------------------------------------------------------------


def test_overfits_four_scenes() -> None:
    """The issue's check: a head trained on 4 scenes reaches mIoU > 0.5 on them (SSF + head on a tiny ViT)."""
    model, size = make_model("vit")
    torch.manual_seed(0)
    task = model.add_task("seg", Segmentation(num_classes=3, channels=32, dice_weight=0.5), [mtp.peft.SSF()])
    images, targets = _scenes(4, size)
    metric = MulticlassJaccardIndex(num_classes=3, ignore_index=IGNORE)

    def miou() -> float:
        masks = torch.stack([r["mask"] for r in model.predict(images, "seg")["seg"]])  # (N, H, W)
        return float(metric(masks, targets))

    assert miou() < 0.5  # the untrained head does not pass by chance
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters("seg"), lr=3e-3)
    slots = [model.slot("seg")] * len(images)
    for _ in range(24):
        loss = task.head.loss(model(images, slots)["seg"][1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert miou() > 0.5


# --- mixed batches -----------------------------------------------------------------------------------------------


def test_mixed_batch_with_classification() -> None:
    model, size = make_model("vit")
    model.add_task("seg", Segmentation(num_classes=3, channels=16), [mtp.peft.SSF()])
    model.add_task("cls", mtp.tasks.Classification(num_classes=4), [mtp.peft.LoRA(r=2)])
    randomize(model.task("seg"), seed=1)
    randomize(model.task("cls"), seed=2)
    seg, cls = model.slot("seg"), model.slot("cls")
    x = _images(5, size, seed=4)
    with torch.no_grad():
        out = model(x, [seg, cls, -1, seg, cls])
        alone = model(x[[0, 3]], [seg, seg])["seg"][1]
        seg_all = model(x, [seg] * 5)["seg"][1]
        cls_all = model(x, [cls] * 5)["cls"][1]
    assert out["seg"][0].tolist() == [0, 3] and out["cls"][0].tolist() == [1, 4]
    torch.testing.assert_close(out["seg"][1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cls"][1], cls_all[[1, 4]], atol=1e-5, rtol=1e-5)

    res = model.predict(x, ["seg", "cls"])  # shared prefix path
    masks = torch.stack([r["mask"] for r in res["seg"]])
    assert masks.shape == (5, size, size)
    top2 = seg_all.topk(2, dim=1).values  # (N, 2, H, W)
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # compare argmax only where it is not a near-tie
    assert clear.float().mean() > 0.9
    assert (masks[clear] == seg_all.argmax(1)[clear]).all()
    torch.testing.assert_close(torch.stack([r["logits"] for r in res["cls"]]), cls_all, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path) -> None:
    model, size = make_model("cnn")
    cfg = Segmentation(num_classes=3, channels=16, strides=(4, 8, 16, 32, 64), class_names=("bg", "x", "y"))
    model.add_task("seg", cfg, [mtp.peft.BitFit()])
    randomize(model.task("seg"))
    x = _images(2, size)
    with torch.no_grad():
        before = model(x, [0, 0])["seg"][1]
    model.save_task("seg", tmp_path / "seg")
    model.remove_task("seg")
    task = model.load_task(tmp_path / "seg")
    assert task.head_config == cfg
    with torch.no_grad():
        torch.testing.assert_close(model(x, [0, 0])["seg"][1], before, rtol=0, atol=0)
