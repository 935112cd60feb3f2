"""WiSE for PETL: a task at weight-space coefficient alpha, between a reference (alpha = 0) and itself (1)."""

from __future__ import annotations

import pytest
import torch

import multitask_peft as mtp
from conftest import example_config, make_model, randomize
from multitask_peft.peft import METHODS

WISE_METHODS = sorted(m for m in METHODS.names() if METHODS.get(m).wise)


def _logits(model: mtp.MultiTaskModel, images: torch.Tensor, task: str) -> torch.Tensor:
    return torch.stack([r["logits"] for r in model.predict(images, [task])[task]])


@pytest.mark.parametrize("method", WISE_METHODS)
def test_alpha_ends_are_task_and_reference_and_half_lies_between(kind: str, method: str) -> None:
    config = example_config(method, kind)
    if config is None:
        pytest.skip(f"{method} does not apply to {kind} backbones")
    model, size = make_model(kind)
    head = mtp.tasks.Classification(num_classes=5)
    randomize(model.add_task("probe", head, [mtp.peft.LinearProbe()]), seed=3)
    randomize(model.add_task("task", head, [config]), std=0.05)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    task, probe = _logits(model, images, "task"), _logits(model, images, "probe")

    model.add_wise("one", "task", 1.0, reference="probe")
    model.add_wise("zero", "task", 0.0, reference="probe")
    model.add_wise("mid", "task", 0.5, reference="probe")
    torch.testing.assert_close(_logits(model, images, "one"), task, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, images, "zero"), probe, atol=1e-5, rtol=1e-5)
    half = _logits(model, images, "mid")
    assert (half - task).abs().max() > 1e-4 and (half - probe).abs().max() > 1e-4
    # "between": closer to each end than the ends are to each other
    span = (task - probe).norm()
    assert (half - task).norm() < span and (half - probe).norm() < span
    if METHODS.get(method).foldable:  # a fixed alpha folds like any task: folded == unfolded at alpha 0.5
        folded = model.merged_backbone("mid")
        with torch.no_grad():
            expected = model.forward_features(images, [model.slot("mid")] * 3).pooled
            got = folded.forward_head(folded.forward_features(images), pre_logits=True)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_zero_reference_and_task_unchanged(kind: str) -> None:
    model, size = make_model(kind)
    config = example_config("ssf", kind)
    task = model.add_task("task", mtp.tasks.Classification(num_classes=4), [config])
    randomize(task)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    wise = model.wise_task("task", 0.0)
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items())  # the task itself is untouched
    images = torch.randn(2, 3, size, size)
    model.add_wise("zero", "task", 0.0)
    for r in model.predict(images, ["zero"])["zero"]:
        assert torch.count_nonzero(r["logits"]) == 0  # zeros reference: alpha 0 is an all-zero head
    assert wise.slot == -1 and "zero" in model.tasks


def test_wise_errors_name_the_problem() -> None:
    model, _ = make_model("vit")
    head = mtp.tasks.Classification(num_classes=4)
    model.add_task("lora", head, [mtp.peft.LoRA(r=2)])
    model.add_task("vpt", head, [mtp.peft.VPT(num_tokens=2)])
    model.add_task("other", mtp.tasks.Classification(num_classes=3), [])
    model.add_task("adapted", head, [mtp.peft.SSF()])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        model.wise_task("lora", 1.5)
    with pytest.raises(ValueError, match=r"`prompt_scale` should be in \[0, 1\]"):
        mtp.peft.VPT(prompt_scale=2.0)
    with pytest.raises(ValueError, match="must have a head like task 'lora'"):
        model.wise_task("lora", 0.5, reference="other")
    with pytest.raises(ValueError, match=r"must leave the backbone frozen.*\['ssf'\]"):
        model.wise_task("lora", 0.5, reference="adapted")
    with pytest.raises(ValueError, match="already exists"):
        model.add_wise("adapted", "lora", 0.5)
    with pytest.raises(ValueError, match="'half' is reserved"):  # an nn.ModuleDict attribute
        model.add_wise("half", "lora", 0.5)
    assert model.tasks == ["lora", "vpt", "other", "adapted"]


def test_per_call_alpha_in_predict_and_predict_each() -> None:
    model, size = make_model("vit")
    head = mtp.tasks.Classification(num_classes=4)
    randomize(model.add_task("probe", head, []), seed=3)
    task = model.add_task("task", head, [mtp.peft.LoRA(r=2), mtp.peft.SSF()])
    randomize(task)
    model.add_wise("mid", "task", 0.5, reference="probe")
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = _logits(model, images, "mid")
    version = model.version
    out = model.predict(images, ["task", "probe"], alpha={"task": 0.5}, reference="probe")
    torch.testing.assert_close(torch.stack([r["logits"] for r in out["task"]]), expected)
    torch.testing.assert_close(torch.stack([r["logits"] for r in out["probe"]]), _logits(model, images, "probe"))
    assert model.tasks == ["probe", "task", "mid"] and model.version == version  # the copy is hidden
    assert len(model._wise_copies) == 1
    names = {n for n, _ in model.named_parameters()}
    model.predict(images, ["task"], alpha=0.5, reference="probe")  # reused, not rebuilt
    assert len(model._wise_copies) == 1 and {n for n, _ in model.named_parameters()} == names
    # per image: image 0 as trained, image 1 at alpha 0 (the reference)
    each = model.predict_each(images, [["task"], ["task"]], alpha=[None, {"task": 0.0}], reference=[None, "probe"])
    torch.testing.assert_close(each[0]["task"]["logits"], _logits(model, images[:1], "task")[0])
    torch.testing.assert_close(each[1]["task"]["logits"], _logits(model, images[1:], "probe")[0], atol=1e-5, rtol=1e-5)
    # trained further: the next call sees the new weights
    with torch.no_grad():
        next(task.head.parameters()).add_(1.0)
    model.remove_task("mid")
    model.add_wise("mid", "task", 0.5, reference="probe")
    out = model.predict(images, ["task"], alpha=0.5, reference="probe")
    torch.testing.assert_close(torch.stack([r["logits"] for r in out["task"]]), _logits(model, images, "mid"))
    model.remove_task("task")  # its copies go with it
    assert len(model._wise_copies) == 0 and model.tasks == ["probe", "mid"]
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got -0.1"):
        model.predict(images, ["probe"], alpha=-0.1)
    with pytest.raises(ValueError, match="one entry per image"):
        model.predict_each(images, [["probe"], ["probe"]], alpha=[0.5])


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_alpha_scales_the_attention_paid_to_prompts(deep: bool, tmp_path) -> None:
    model, size = make_model("vit")
    head = mtp.tasks.Classification(num_classes=4)
    randomize(model.add_task("probe", head, [mtp.peft.LinearProbe()]), seed=3)
    randomize(model.add_task("vpt", head, [mtp.peft.VPT(num_tokens=3, deep=deep)]), std=0.5)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    task, probe = _logits(model, images, "vpt"), _logits(model, images, "probe")
    # alpha 0: the other tokens never attend to the prompts, so the frozen backbone's features come out
    zero = model.wise_task("vpt", 0.0)
    assert zero.peft["vpt"].config.prompt_scale == 0.0 and model.task("vpt").peft["vpt"].config.prompt_scale == 1.0
    with torch.no_grad():
        plain = model.forward_features(images, [-1] * 3).pooled
        model.add_wise("zero", "vpt", 0.0)
        got = model.forward_features(images, [model.slot("zero")] * 3).pooled
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    # rows at different alphas share one prompt stream (one mask row each) and match their own calls
    each = model.predict_each(images, [["vpt"]] * 3, alpha=[None, {"vpt": 0.0}, {"vpt": 0.5}], reference=["probe"] * 3)
    torch.testing.assert_close(each[0]["vpt"]["logits"], task[0])
    torch.testing.assert_close(each[1]["vpt"]["logits"], probe[1], atol=1e-5, rtol=1e-5)
    model.add_wise("mid", "vpt", 0.5, reference="probe")
    mid = _logits(model, images, "mid")
    torch.testing.assert_close(each[2]["vpt"]["logits"], mid[2], atol=1e-5, rtol=1e-5)
    span = (task - probe).norm()
    assert (mid - task).norm() < span and (mid - probe).norm() < span and (mid - task).abs().max() > 1e-4
    # a fixed alpha is saved with the task (its `prompt_scale`) and comes back from disk
    model.save_task("mid", tmp_path / "mid")
    again, _ = make_model("vit")
    again.load_task(tmp_path / "mid")
    assert again.task("mid").peft["vpt"].config.prompt_scale == 0.5
    torch.testing.assert_close(_logits(again, images, "mid"), mid)
