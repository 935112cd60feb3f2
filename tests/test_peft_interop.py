"""HF PEFT's LoRA / DoRA adapter files <-> our tasks: equal features (1e-5) both ways, and clear refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import multitask_peft as mtp
from conftest import BACKBONES, make_model, randomize
from multitask_peft.cli import main
from multitask_peft.run_config import RunConfig, build_backbone
from multitask_peft.rundir import RunDirectory
from multitask_peft.task_io import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_task_config,
)

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

#: PEFT targets per backbone: a ViT's fused qkv, plain Linears (fc1, proj; "proj" also matches the patch-embedding
#: conv); a CNN's pointwise convs and a 3x3 stride-2 conv (conv_exp).
TARGETS = {"vit": ["qkv", "fc1", "proj"], "cnn": ["conv_pw", "conv_pwl", "conv_exp"]}
CLASSIFIER = {"vit": "head", "cnn": "classifier"}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _twin(model: mtp.MultiTaskModel, kind: str, num_classes: int = 5) -> torch.nn.Module:
    """The plain timm model PEFT wraps: our backbone's weights plus a classifier of `num_classes`."""
    name, kwargs, _ = BACKBONES[kind]
    twin = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    result = twin.load_state_dict(model.backbone.plain_copy().state_dict(), strict=False)
    assert sorted(result.missing_keys) == [f"{CLASSIFIER[kind]}.bias", f"{CLASSIFIER[kind]}.weight"]
    return twin


def _peft_model(twin: torch.nn.Module, seed: int = 1, **options: object) -> torch.nn.Module:
    """`get_peft_model` with every trainable tensor (A, B, magnitudes, saved classifier) perturbed: not an identity."""
    model = peft.get_peft_model(copy.deepcopy(twin), peft.LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def _peft_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    inner = model.base_model.model
    return inner.forward_head(inner.forward_features(x), pre_logits=True)  # (N, D) pooled pre-logits


def _ours(model: mtp.MultiTaskModel, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, head logits) of task `name` for every row of `x`."""
    features = model.forward_features(x, [model.slot(name)] * len(x))
    return features.pooled, model.task(name).head(features)


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_as_task(kind: str, dora: bool, tmp_path: Path) -> None:
    model, size = make_model(kind)
    x = _images(size)
    twin = _twin(model, kind)
    theirs = _peft_model(twin, r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=dora,
                         modules_to_save=[CLASSIFIER[kind]])  # fmt: skip
    theirs.save_pretrained(tmp_path / "peft")
    task = model.load_task(tmp_path / "peft", name="imported")  # the saved classifier is the head
    assert [c.method for c in task.peft_configs] == ["dora" if dora else "lora"]
    assert sorted(task.peft_configs[0].targets) == sorted(TARGETS[kind])  # (PEFT saves them as a set)
    with torch.no_grad():
        pooled, logits = _ours(model, "imported", x)
        torch.testing.assert_close(pooled, _peft_features(theirs, x), **TOL)
        torch.testing.assert_close(logits, theirs(x), **TOL)
        assert not torch.allclose(pooled, model.forward_features(x, [-1] * len(x)).pooled, atol=1e-3)
    # Saved as our task folder, it loads back bit-exactly.
    model.save_task("imported", tmp_path / "task")
    model.load_task(tmp_path / "task", name="again")
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, "again", x), (pooled, logits), atol=0, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_task_saves_for_peft(kind: str, dora: bool, tmp_path: Path) -> None:
    model, size = make_model(kind)
    x = _images(size)
    method = mtp.peft.DoRA if dora else mtp.peft.LoRA
    model.add_task("cls", mtp.tasks.Classification(num_classes=5), method(r=4, alpha=6, targets=tuple(TARGETS[kind])))
    randomize(model.task("cls"))
    model.save_task("cls", tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["modules_to_save"]) == (TARGETS[kind], [CLASSIFIER[kind]])
    theirs = peft.PeftModel.from_pretrained(_twin(model, kind), tmp_path / "peft").eval()
    with torch.no_grad():
        pooled, logits = _ours(model, "cls", x)
        torch.testing.assert_close(_peft_features(theirs, x), pooled, **TOL)
        torch.testing.assert_close(theirs(x), logits, **TOL)
    # ... and the PEFT files load back as the same task (the export's backbone fingerprint checked).
    model.load_task(tmp_path / "peft", name="back")
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, "back", x), (pooled, logits), **TOL)


def test_rank_alpha_patterns_rslora_and_fan_in_fan_out(tmp_path: Path) -> None:
    """rank_pattern / alpha_pattern become one LoRA config per (r, alpha); use_rslora and lora_dropout carry over;
    fan_in_fan_out=True is what PEFT makes of it on nn.Linear (False)."""
    model, size = make_model("vit")
    x = _images(size)
    twin = _twin(model, "vit")
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv", "fc1"], "use_rslora": True, "lora_dropout": 0.1}
    options.update(rank_pattern={"blocks.0.attn.qkv": 2}, alpha_pattern={"fc1": 3})
    theirs = _peft_model(twin, **options)
    theirs.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "peft").eval()
    task = model.load_task(tmp_path / "peft", name="patterns", head=mtp.tasks.Classification(num_classes=3))
    assert sorted((c.r, c.alpha, c.use_rslora, c.dropout) for c in task.peft_configs) == [
        (2, 8, True, 0.1), (4, 3, True, 0.1), (4, 8, True, 0.1)
    ]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, "patterns", x)[0], _peft_features(theirs, x), **TOL)
    # Out again: the patterns come back as patterns (and the new linear head as the classifier).
    model.save_task("patterns", tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    again = peft.PeftModel.from_pretrained(_twin(model, "vit", num_classes=3), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(_peft_features(again, x), _peft_features(theirs, x), **TOL)
        torch.testing.assert_close(again(x), _ours(model, "patterns", x)[1], **TOL)


def test_qkv_slices_export_as_one_fused_lora(tmp_path: Path) -> None:
    """A per-slice q / v LoRA is one LoRA of the fused qkv with block factors (rank 2 r) in PEFT's terms."""
    model, size = make_model("vit")
    x = _images(size)
    model.add_task("qv", mtp.tasks.Classification(num_classes=5), mtp.peft.LoRA(r=2, alpha=3, qkv_slices=("q", "v")))
    model.add_task("fc", mtp.tasks.Classification(num_classes=5), mtp.peft.LoRA(r=3, use_rslora=True, targets=("fc1",)))
    for name in ("qv", "fc"):
        randomize(model.task(name))
    model.save_task("qv", tmp_path / "qv", format="peft")
    assert json.loads((tmp_path / "qv" / "adapter_config.json").read_text())["r"] == 4
    for name in ("qv", "fc"):
        model.save_task(name, tmp_path / name, format="peft")
        theirs = peft.PeftModel.from_pretrained(_twin(model, "vit"), tmp_path / name).eval()
        with torch.no_grad():
            pooled, logits = _ours(model, name, x)
            torch.testing.assert_close(_peft_features(theirs, x), pooled, **TOL)
            torch.testing.assert_close(theirs(x), logits, **TOL)


def _edited(src: Path, dst: Path, **fields: object) -> Path:
    """A copy of PEFT folder `src` with config fields changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return dst


def test_what_a_task_cannot_hold_is_refused_by_name(tmp_path: Path) -> None:
    model, size = make_model("vit")
    twin = _twin(model, "vit")
    _peft_model(twin, r=4, target_modules=["qkv"]).save_pretrained(tmp_path / "ok")
    head = mtp.tasks.Classification(num_classes=3)
    cases = {
        "bias": ({"bias": "all"}, r"PEFT field `bias` is 'all'; supported: 'none'"),
        "lora_bias": ({"lora_bias": True}, r"PEFT field `lora_bias` is True; supported: unset"),
        "peft_type": ({"peft_type": "IA3"}, r"PEFT field `peft_type` is 'IA3'; supported: 'LORA'"),
        "init": ({"init_lora_weights": "pissa"}, r"`init_lora_weights` is 'pissa'.*rewrites the base weights"),
        "replication": ({"layer_replication": [[0, 1]]}, r"`layer_replication` is \[\[0, 1\]\]; supported: unset"),
        "class": ({"auto_mapping": {"base_model_class": "ResNet"}}, r"saved for a ResNet.*is a VisionTransformer"),
        "rank": ({"r": 8}, r"'blocks.0.attn.qkv' has rank 4 in adapter_model.safetensors, its config says r=8"),
    }
    for name, (fields, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            model.load_task(_edited(tmp_path / "ok", tmp_path / name, **fields), head=head)
    with pytest.raises(ValueError, match=r"has no head of ours; pass head=.*modules_to_save=\['head'\]"):
        model.load_task(tmp_path / "ok")
    # A module this backbone has not (an adapter of another architecture).
    state = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    unknown = _edited(tmp_path / "ok", tmp_path / "unknown")
    state = {k.replace("blocks.0.attn.qkv", "blocks.0.attn.nope"): v for k, v in state.items()}
    save_file(state, unknown / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"targets modules that test_vit has not .*\['blocks.0.attn.nope'\]"):
        model.load_task(unknown, head=head)
    pickled = _edited(tmp_path / "ok", tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle, not loaded here"):
        model.load_task(pickled, head=head)
    assert model.tasks == []  # nothing half-loaded
    # Our task folders are not mistaken for PEFT's, nor PEFT's for ours when read as a task config.
    with pytest.raises(ValueError, match=r"an HF PEFT adapter \(peft_type 'LORA'\).*mtpeft import-peft"):
        read_task_config(tmp_path / "ok")


def test_export_refuses_what_peft_cannot_hold(tmp_path: Path) -> None:
    model, _ = make_model("cnn")
    cls = mtp.tasks.Classification(num_classes=3)
    model.add_task("ssf", cls, [mtp.peft.LoRA(r=2), mtp.peft.SSF()])
    model.add_task("mixed", cls, [mtp.peft.LoRA(r=2, targets=("conv_pw",)), mtp.peft.DoRA(r=2, targets=("conv_pwl",))])
    model.add_task("depthwise", cls, mtp.peft.LoRA(r=2, targets=("conv_dw",)))
    model.add_task("probe", cls, [])
    model.add_task("seg", mtp.tasks.Segmentation(num_classes=3), mtp.peft.LoRA(r=2))
    cases = {
        "ssf": r"task 'ssf' uses ssf, which HF PEFT's LoRA format cannot hold; exportable: tasks using only lora or",
        "mixed": "task 'mixed' mixes lora and dora",
        "depthwise": r"'blocks.3.0.conv_dw' is a Conv2d with groups=128; .* supported: groups=1",
        "probe": r"task 'probe' has no PEFT modules \(head only\)",
    }
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            model.save_task(name, tmp_path / name, format="peft")
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="format should be 'task' or 'peft'"):
        model.save_task("seg", tmp_path / "seg", format="onnx")
    with pytest.warns(UserWarning, match="task 'seg': the head is not written .* segmentation head"):
        model.save_task("seg", tmp_path / "seg", format="peft")
    assert json.loads((tmp_path / "seg" / "adapter_config.json").read_text())["modules_to_save"] is None


def test_exported_adapter_remembers_its_backbone(tmp_path: Path) -> None:
    """PEFT ignores the safetensors metadata; loading the export back checks the backbone fingerprint in it."""
    model, _ = make_model("vit")
    model.add_task("cls", mtp.tasks.Classification(num_classes=3), mtp.peft.LoRA(r=2))
    model.save_task("cls", tmp_path / "peft", format="peft")
    other, _ = make_model("vit")
    with torch.no_grad():
        other.backbone.model.blocks[0].mlp.fc1.weight.add_(1e-3)
    other.backbone._fingerprint = None
    with pytest.raises(ValueError, match="exported from a task of backbone 'test_vit:"):
        other.load_task(tmp_path / "peft")
    assert other.tasks == []


def test_old_file_names_still_load(tmp_path: Path) -> None:
    """Folders written before the rename (our format under PEFT's file names) load; saving there replaces them."""
    model, size = make_model("vit")
    x = _images(size)
    model.add_task("cls", mtp.tasks.Classification(num_classes=3), mtp.peft.LoRA(r=2))
    randomize(model.task("cls"))
    model.save_task("cls", tmp_path / "old")
    (tmp_path / "old" / CONFIG_NAME).rename(tmp_path / "old" / LEGACY_CONFIG_NAME)
    (tmp_path / "old" / WEIGHTS_NAME).rename(tmp_path / "old" / LEGACY_WEIGHTS_NAME)
    model.load_task(tmp_path / "old", name="old")
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, "old", x), _ours(model, "cls", x), atol=0, rtol=0)
    model.save_task("old", tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_cli_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`mtpeft export-peft RUN OUT --task T` and `mtpeft import-peft PEFT_DIR OUT --run RUN` (or --backbone)."""
    name, kwargs, size = BACKBONES["vit"]
    data = {"source": "multifashion", "root": str(tmp_path / "no-data"), "task": "classification", "image_size": size}
    task = {"head": {"type": "classification", "num_classes": 4}, "peft": [{"method": "dora", "r": 2}], "data": data}
    config = RunConfig.from_dict(
        {"backbone": {"name": name, "kwargs": kwargs}, "tasks": {"garment": task}, "output": str(tmp_path / "run")}
    )
    run = RunDirectory.create(tmp_path / "run", config)
    model = build_backbone(config)
    model.add_task("garment", config.tasks["garment"].head, config.tasks["garment"].peft)
    randomize(model.task("garment"))
    model.save_task("garment", run.tasks_dir / "garment")
    main(["export-peft", str(run.path), str(tmp_path / "peft"), "--task", "garment"])
    assert "num_classes=4" in capsys.readouterr().out
    x = _images(size)
    theirs = peft.PeftModel.from_pretrained(_twin(model, "vit", num_classes=4), tmp_path / "peft").eval()
    with torch.no_grad():
        pooled, logits = _ours(model, "garment", x)
        torch.testing.assert_close(_peft_features(theirs, x), pooled, **TOL)
    main(["import-peft", str(tmp_path / "peft"), str(run.tasks_dir / "copy"), "--run", str(run.path)])
    model.load_task(run.tasks_dir / "copy")
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, "copy", x), (pooled, logits), **TOL)
    # --backbone with a weight file: the same backbone, so the task loads into the run's model too.
    save_file(model.backbone.plain_copy().state_dict(), tmp_path / "w.safetensors")
    args = ["--backbone", name, "--pretrained", str(tmp_path / "w.safetensors"), "--img-size", str(size)]
    main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "named"), "--name", "renamed", "--head-classes", "2"]
         + args)  # fmt: skip
    assert model.load_task(tmp_path / "named").head_config.num_classes == 2
    with pytest.raises(SystemExit):
        main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "x")])
    assert "--run RUN_DIR, or --backbone TIMM_NAME" in capsys.readouterr().err
