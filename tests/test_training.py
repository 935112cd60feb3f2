"""Joint trainer: frozen backbone, resume equivalence, atomic checkpoints, NaN handling, samplers, weighting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model
from multitask_peft.training import (
    NonFiniteLossError,
    TaskData,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    read_log,
    sample_tasks,
    task_probabilities,
)
from multitask_peft.training import checkpoint as checkpoint_module


class RandomImages(torch.utils.data.Dataset):
    """Random normalised images with int labels (or masks); NaN images once `poison_after` items were read."""

    def __init__(self, n: int, size: int, num_classes: int = 3, seed: int = 0, masks: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        if masks:
            self.targets = list(torch.randint(0, num_classes, (n, size, size), generator=g))
        else:
            self.targets = torch.randint(0, num_classes, (n,), generator=g).tolist()
        self.poison_after: int | None = None
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, object]:
        self.reads += 1
        image = self.images[i] + 0.01 * torch.randn(self.images[i].shape)  # "augmentation": uses the torch RNG
        if self.poison_after is not None and self.reads > self.poison_after:
            image = torch.full_like(image, float("nan"))
        return image, self.targets[i]


def two_task_model(dropout: float = 0.1) -> mtp.MultiTaskModel:
    model, _ = make_model("vit")
    model.add_task("cls", mtp.tasks.Classification(num_classes=3, dropout=dropout), [mtp.peft.LoRA(r=2)])
    model.add_task("ssf", mtp.tasks.Classification(num_classes=4), [mtp.peft.SSF()])
    return model


def two_task_data() -> dict[str, TaskData]:
    return {
        "cls": TaskData(RandomImages(12, 64, 3, seed=1)),
        "ssf": TaskData(RandomImages(10, 64, 4, seed=2), loss_weight=0.5, batch_size=3),
    }


def config(**kw: object) -> TrainConfig:
    base = dict(steps=3, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=100, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def task_state(model: mtp.MultiTaskModel, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.task(name).state_dict().items()}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="sampling.*'uniform'"):
        TrainConfig(sampling="uniform")
    with pytest.raises(ValueError, match="`steps`.*0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="amp.*'fp16'"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="loss_weight"):
        TaskData(RandomImages(2, 64), loss_weight=0)
    model = two_task_model()
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        Trainer(model, {"nope": TaskData(RandomImages(2, 64))}, config(), "unused")


def test_backbone_bit_identical_and_only_task_params_change(tmp_path: Path) -> None:
    model = two_task_model()
    model.add_task("idle", mtp.tasks.Classification(num_classes=2), [mtp.peft.LoRA(r=2)])  # not trained
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before = {n: task_state(model, n) for n in model.tasks}
    trainer = Trainer(model, two_task_data(), config(weight_decay=0.1), tmp_path)
    expected = {id(p) for n in ("cls", "ssf") for p in model.trainable_parameters(n)}
    assert {id(p) for p in trainer.parameters()} == expected
    trainer.fit()
    after = model.backbone.state_dict()
    assert after.keys() == backbone.keys()
    assert all(torch.equal(after[k], backbone[k]) for k in backbone)
    for name in ("cls", "ssf"):
        now = task_state(model, name)
        changed = [k for k in now if not torch.equal(now[k], before[name][k])]
        assert any(k.startswith("head.") for k in changed) and any(not k.startswith("head.") for k in changed)
    idle = task_state(model, "idle")
    assert all(torch.equal(idle[k], before["idle"][k]) for k in idle)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["ssf/peft_no_decay"]["weight_decay"] == 0.0 and groups["cls/head_no_decay"]["weight_decay"] == 0.0
    assert groups["cls/head_decay"]["weight_decay"] == 0.1
    no_decay = {id(p) for p in groups["ssf/peft_no_decay"]["params"]}
    for name, p in model.task("ssf").named_parameters():  # every SSF tensor is exempt from decay
        assert name.startswith("head.") or id(p) in no_decay, name


def test_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(steps=6, checkpoint_every=3, warmup_steps=2, weight_decay=0.05, loss_weighting="uncertainty")
    full = two_task_model()
    Trainer(full, two_task_data(), cfg, tmp_path / "full").fit()

    # A run killed after step 4 (its last checkpoint: step 3), then resumed in a fresh process-like setting.
    original = Trainer._train_step

    def killed(self: Trainer) -> dict[str, float]:
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(two_task_model(), two_task_data(), cfg, tmp_path / "part").fit()
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert latest_checkpoint(tmp_path / "part").name == "step_000003"
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG it starts with
    resumed_model = two_task_model()
    summary = Trainer(resumed_model, two_task_data(), cfg, tmp_path / "part").fit(resume=True)
    assert summary["step"] == 6

    full_log, part_log = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in part_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in part_log] == [r["loss"] for r in full_log]
    for name in ("cls", "ssf"):
        a, b = task_state(full, name), task_state(resumed_model, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(two_task_model(), two_task_data(), config(steps=2, checkpoint_every=2), tmp_path).fit()
    assert latest_checkpoint(tmp_path).name == "step_000002"
    real_save = torch.save

    def broken_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"partial")  # half-written file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        Trainer(two_task_model(), two_task_data(), config(steps=4, checkpoint_every=2), tmp_path).fit(resume=True)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert not list(root.glob(".tmp*"))
    assert load_trainer_state(root / "step_000002")["step"] == 2

    # A run killed outright mid-save leaves a temp dir: ignored by resume, removed by the next save.
    (root / ".tmp_step_000004_1").mkdir()
    (root / ".tmp_step_000004_1" / "trainer_state.pt").write_bytes(b"junk")
    summary = Trainer(two_task_model(), two_task_data(), config(steps=4, checkpoint_every=2), tmp_path).fit(resume=True)
    assert summary["step"] == 4 and latest_checkpoint(tmp_path).name == "step_000004"
    assert not list(root.glob(".tmp*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    data = two_task_data()
    data["cls"].dataset.poison_after = 8  # batch size 4: steps 1-2 are clean, step 3 reads NaN images
    trainer = Trainer(two_task_model(), data, config(steps=5, checkpoint_every=2), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"task 'cls': loss is nan at step 3.*step_000002"):
        trainer.fit()
    assert trainer.step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert isinstance(NonFiniteLossError("x"), FloatingPointError)


def test_nan_loss_drops_the_task_and_the_others_go_on(tmp_path: Path) -> None:
    data = two_task_data()
    data["cls"].dataset.poison_after = 8  # steps 1-2 clean, step 3 NaN
    model = two_task_model()
    trainer = Trainer(model, data, config(steps=5, checkpoint_every=2, on_nonfinite="drop_task"), tmp_path)
    ssf_before = task_state(model, "ssf")
    summary = trainer.fit()
    assert summary["step"] == 5 and summary["diverged"] == {"cls": 3} and trainer.diverged == {"cls": 3}
    step2 = two_task_model()
    checkpoint_module.load_task_weights(step2, tmp_path / "checkpoints" / "step_000002", "cls")
    for key, value in task_state(model, "cls").items():  # its last finite weights: those after step 2
        assert torch.equal(value, step2.task("cls").state_dict()[key]), key
    assert all(torch.isfinite(v).all() for v in task_state(model, "cls").values())
    assert any(not torch.equal(v, ssf_before[k]) for k, v in task_state(model, "ssf").items())
    assert data["cls"].dataset.reads == 12  # not drawn after step 3
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "cls" in records[1]["loss"] and "cls" not in records[2]["loss"]
    assert records[2]["diverged"] == {"cls": 3} and records[-1]["step"] == 5
    assert load_trainer_state(latest_checkpoint(tmp_path))["diverged"] == {"cls": 3}
    again = Trainer(two_task_model(), two_task_data(), config(steps=6, on_nonfinite="drop_task"), tmp_path)
    again.resume()
    assert again.diverged == {"cls": 3}  # a resumed run leaves it out too
    # every task diverged: the run stops
    data = two_task_data()
    for d in data.values():
        d.dataset.poison_after = 0
    with pytest.raises(NonFiniteLossError, match="every task diverged"):
        Trainer(two_task_model(), data, config(on_nonfinite="drop_task"), tmp_path / "all").fit()
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="skip")


def test_sampler_frequencies() -> None:
    names, sizes, steps = ["a", "b", "c"], [100, 400, 1600], 3000

    def freqs(sampling: str) -> torch.Tensor:
        counts = torch.zeros(3)
        for s in range(steps):
            for t in sample_tasks(names, sizes, s, 1, sampling, 2.0, seed=0):
                counts[names.index(t)] += 1
        return counts / steps

    assert freqs("round_robin").tolist() == pytest.approx([1 / 3] * 3, abs=1e-3)
    assert torch.allclose(freqs("proportional"), torch.tensor([1, 4, 16]) / 21, atol=0.03)
    assert torch.allclose(freqs("temperature"), torch.tensor([10.0, 20, 40]) / 70, atol=0.03)
    assert torch.allclose(task_probabilities(sizes, "temperature", 1.0), task_probabilities(sizes, "proportional"))
    assert sample_tasks(names, sizes, 7, 2, "proportional", 2.0, 0) == sample_tasks(
        names, sizes, 7, 2, "proportional", 2.0, 0
    )
    assert sample_tasks(names, sizes, 0, 3, "temperature", 2.0, 0) == names
    assert sample_tasks(names, sizes, 1, 2, "round_robin", 2.0, 0) == ["a", "c"]  # tasks 2, 3 (mod 3)


def test_tasks_per_step_and_mixed_shapes(tmp_path: Path) -> None:
    model, _ = make_model("cnn")
    model.add_task("cls", mtp.tasks.Classification(num_classes=3), [mtp.peft.SSF()])
    model.add_task("seg", mtp.tasks.Segmentation(num_classes=3, channels=8, strides=(8, 16)), [mtp.peft.LoRA(r=2)])
    data = {"cls": TaskData(RandomImages(8, 64)), "seg": TaskData(RandomImages(8, 32, masks=True), batch_size=2)}
    Trainer(model, data, config(steps=2, tensorboard=True), tmp_path / "both").fit()
    log = read_log(tmp_path / "both")
    assert all(set(r["loss"]) == {"cls", "seg"} for r in log)
    assert list((tmp_path / "both" / "tb").iterdir())  # TensorBoard event file
    Trainer(model, data, config(steps=4, tasks_per_step=1), tmp_path / "one").fit()
    assert [list(r["loss"]) for r in read_log(tmp_path / "one")] == [["cls"], ["seg"], ["cls"], ["seg"]]


def test_uncertainty_weighting_learns_log_variances(tmp_path: Path) -> None:
    trainer = Trainer(two_task_model(), two_task_data(), config(steps=2, loss_weighting="uncertainty"), tmp_path)
    log_vars = dict(trainer.weighting.log_vars)
    assert {id(p) for p in log_vars.values()} <= {id(p) for p in trainer.parameters()}
    summary = trainer.fit()
    for p in log_vars.values():
        assert p.grad is not None and p.grad.abs() > 0 and p.item() != 0.0
    assert set(summary["loss_weights"]) == {"cls", "ssf"}
    assert summary["loss_weights"]["ssf"] != 0.5  # learned, no longer the fixed weight


@pytest.mark.parametrize("peft", [[], [mtp.peft.LoRA(r=2)]], ids=["linear_probe", "lora"])
def test_grad_accum_matches_full_batch(tmp_path: Path, peft: list) -> None:
    grads = []
    for batch, accum in ((8, 1), (4, 2)):
        model, _ = make_model("vit")
        model.add_task("cls", mtp.tasks.Classification(num_classes=3), peft)
        trainer = Trainer(
            model,
            {"cls": TaskData(RandomImages(8, 64))},
            config(steps=1, batch_size=batch, grad_accum=accum),
            tmp_path / str(accum),
        )
        trainer.fit()
        grads.append([p.grad.clone() for p in trainer.parameters()])  # the last step's gradients stay in .grad
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_clip_norm_clips(tmp_path: Path) -> None:
    norms = {}
    for clip in (None, 1e-3):
        trainer = Trainer(two_task_model(), two_task_data(), config(steps=1, clip_norm=clip), tmp_path / str(clip))
        trainer.fit()
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.parameters()])).item()
    assert norms[None] > 1e-2
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_and_schedule(tmp_path: Path) -> None:
    cfg = config(steps=4, amp="bf16", warmup_steps=2, min_lr_ratio=0.1, head_lr=1e-3, checkpoint_every=2)
    summary = Trainer(two_task_model(), two_task_data(), cfg, tmp_path).fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["losses"].values())
    lrs = [r["lr"] for r in read_log(tmp_path)]
    assert [round(r["cls/peft_decay"], 6) for r in lrs] == [0.005, 0.01, 0.01, 0.0055]  # each step's: warm-up, cosine
    assert lrs[1]["cls/head_decay"] == pytest.approx(1e-3) and lrs[1]["ssf/head_decay"] == pytest.approx(1e-3)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert set(record) >= {"step", "loss", "lr", "time"}


def test_task_stream_resumes_and_ignores_workers() -> None:
    from multitask_peft.tasks import collate_pairs
    from multitask_peft.training import TaskStream

    data = RandomImages(7, 16)
    reference = TaskStream("t", data, 3, collate_pairs, seed=5)
    batches = [next(reference) for _ in range(5)]  # 2 batches per epoch (the 7th item is dropped)
    assert reference.state() == {"epoch": 2, "position": 1}
    resumed = TaskStream("t", data, 3, collate_pairs, seed=5, epoch=1, position=1)
    workers = TaskStream("t", data, 3, collate_pairs, seed=5, num_workers=1)
    for k, (images, labels) in enumerate(batches):
        if k >= 3:
            r_images, r_labels = next(resumed)
            assert torch.equal(images, r_images) and torch.equal(labels, r_labels)
        w_images, _ = next(workers)
        assert torch.equal(images, w_images)  # per-item seeds: same "augmentation" in a worker process
    assert not torch.equal(batches[0][0], batches[2][0])  # reshuffled each epoch


def test_non_finite_gradients_with_a_finite_loss_drop_the_task(tmp_path: Path) -> None:
    model = two_task_model()
    head = next(model.task("cls").head.parameters())
    head.register_hook(lambda g: g * float("nan"))  # the loss stays finite, this task's gradients do not
    before = task_state(model, "cls")
    summary = Trainer(model, two_task_data(), config(steps=2, on_nonfinite="drop_task"), tmp_path).fit()
    assert summary["diverged"] == {"cls": 1}
    assert all(torch.equal(v, before[k]) for k, v in task_state(model, "cls").items())  # no update applied
    assert all(torch.isfinite(v).all() for v in task_state(model, "ssf").values())
