"""Ensembles as tasks: an ensemble equals the mean of its members computed separately (eager, evaluation, saved and
loaded), its members run once in the shared pass, the disagreement analysis counts what it says, bad input is refused
with the model unchanged. ONNX, serving and run configs: `test_ensembles_io.py`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.ensemble import ENSEMBLE_CONFIG, combine
from multitask_peft.ensemble_analysis import disagreement


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cls(n: int = 4, **options: object) -> mtp.tasks.Classification:
    return mtp.tasks.Classification(num_classes=n, **options)


def build() -> tuple[mtp.MultiTaskModel, int]:
    """Members that change different backbone parts (late LoRA, SSF everywhere, a probe) and two segmentation tasks,
    with random adapters and heads; plus tasks that must not join them."""
    model, size = make_model("vit")
    model.add_task("late", _cls(), [mtp.peft.LoRA(r=2, targets=r"blocks\.2\.attn\.qkv")])
    model.add_task("ssf", _cls(class_names=("w", "x", "y", "z")), [mtp.peft.SSF()])
    model.add_task("probe", _cls(hidden_dim=8), [])
    model.add_task("seg1", mtp.tasks.Segmentation(num_classes=3, channels=8), [mtp.peft.SSF()])
    model.add_task("seg2", mtp.tasks.Segmentation(num_classes=3, channels=8), [mtp.peft.LoRA(r=2)])
    model.add_task("five", _cls(5), [mtp.peft.BitFit()])
    model.add_task("named", _cls(class_names=("a", "b", "c", "d")), [mtp.peft.BitFit()])
    model.add_task("boxes", mtp.tasks.Detection(num_classes=4, channels=8), [mtp.peft.SSF()])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), std=0.3, seed=k + 1)
    return model, size


@pytest.fixture(scope="module")
def built() -> tuple[mtp.MultiTaskModel, int]:
    model, size = build()
    model.add_ensemble("vote", ["late", "ssf", "probe"])
    model.add_ensemble("avg", ["late", "ssf", "probe"], mode="mean_logit")
    model.add_ensemble("seg", ["seg1", "seg2"])
    return model, size


def _logits(results: list[dict]) -> torch.Tensor:
    return torch.stack([r["logits"] for r in results])  # (N, C)


def _routed_logits(model: mtp.MultiTaskModel, name: str, x: torch.Tensor) -> torch.Tensor:
    """A member's class logits from its own routed forward (no shared prefix, nothing else in the batch)."""
    with torch.no_grad():
        raw = model(x, [model.slot(name)] * len(x))[name][1]
    return model.task(name).head.class_logits(raw, tuple(x.shape[-2:]))


def test_classification_ensemble_is_the_mean_of_its_members(built: tuple) -> None:
    model, size = built
    x = _images(5, size, seed=1)
    alone = {m: _logits(model.predict(x, m)[m]) for m in ("late", "ssf", "probe")}
    assert not torch.allclose(alone["late"], alone["ssf"], atol=1e-2)  # members differ: the test can fail
    out = model.predict(x, ["vote", "avg"])
    probs = torch.stack([v.softmax(-1) for v in alone.values()]).mean(0)  # (N, C)
    torch.testing.assert_close(_logits(out["vote"]).exp(), probs, atol=1e-6, rtol=1e-5)
    assert [r["label"] for r in out["vote"]] == probs.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor([r["score"] for r in out["vote"]]), probs.max(-1).values)
    mean = torch.stack(list(alone.values())).mean(0)
    torch.testing.assert_close(_logits(out["avg"]), mean, atol=1e-5, rtol=1e-5)
    assert [r["label"] for r in out["avg"]] == mean.argmax(-1).tolist()
    assert set(out["vote"][0]) == {"logits", "label", "score"}
    # the ensemble reports its members' class names
    assert model.head_config("vote").class_names == ("w", "x", "y", "z")


def test_segmentation_ensemble_is_the_mean_of_per_pixel_probabilities(built: tuple) -> None:
    model, size = built
    x = _images(2, size, seed=2)
    mask = torch.stack([r["mask"] for r in model.predict(x, "seg")["seg"]])  # (N, H, W)
    probs = torch.stack([_routed_logits(model, m, x).softmax(1) for m in ("seg1", "seg2")]).mean(0)  # (N, C, H, W)
    assert (mask == probs.argmax(1)).float().mean() >= 0.999
    members = [torch.stack([r["mask"] for r in model.predict(x, m)[m]]) for m in ("seg1", "seg2")]
    assert not torch.equal(members[0], members[1])


def test_combine_is_stable_and_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 5, generator=g) * 4 for _ in range(3)]
    expected = torch.stack([x.softmax(1) for x in logits]).mean(0).log()
    torch.testing.assert_close(combine(logits, "mean_prob"), expected, atol=1e-5, rtol=1e-5)
    # a probability that underflows in float32 stays a finite log-probability
    extreme = [torch.tensor([[0.0, -200.0]]), torch.tensor([[0.0, -300.0]])]
    assert torch.isfinite(combine(extreme, "mean_prob")).all()
    with pytest.raises(ValueError, match="mode must be one of"):
        combine(logits, "max")


def test_members_run_once_in_the_shared_pass(built: tuple) -> None:
    """An ensemble asked for together with its members: each member's head runs once over its rows, the shared
    backbone prefix once per image, and the member's own result equals predicting it alone."""
    model, size = built
    n = 3
    x = _images(n, size, seed=3)
    calls: dict[str, list[int]] = {m: [] for m in ("late", "ssf", "probe")}
    hooks = [model.task(m).head.register_forward_hook(lambda mod, a, o, m=m: calls[m].append(len(a[0]))) for m in calls]
    blocks: list[int] = []
    hooks.append(model.backbone.model.blocks[0].register_forward_hook(lambda m, a, o: blocks.append(o.shape[0])))
    try:
        out = model.predict(x, ["vote", "late", "avg"])
    finally:
        for h in hooks:
            h.remove()
    assert calls == {m: [n] for m in calls}
    # blocks.0: plain rows (shared by late and probe) + the SSF rows, which change it
    assert sum(blocks) == 2 * n
    torch.testing.assert_close(_logits(out["late"]), _logits(model.predict(x, "late")["late"]))


def test_predict_each_mixes_ensembles_and_tasks(built: tuple) -> None:
    model, size = built
    x = _images(4, size, seed=4)
    wanted = [["vote"], ["late", "seg"], ["seg", "vote", "ssf", "avg"], ["probe"]]
    out = model.predict_each(x, wanted)
    assert [list(o) for o in out] == wanted
    for i, names in enumerate(wanted):
        alone = model.predict(x[i : i + 1], names)
        for name in names:
            if "mask" in alone[name][0]:
                assert (out[i][name]["mask"] == alone[name][0]["mask"]).float().mean() >= 0.999
            else:
                torch.testing.assert_close(out[i][name]["logits"], alone[name][0]["logits"], atol=1e-5, rtol=1e-5)


def _dataset(model: mtp.MultiTaskModel, size: int, n: int = 12) -> list[tuple[torch.Tensor, int]]:
    """Images labelled by the probe task's own predictions for a third of them and at random otherwise, so that
    members get some right and some wrong."""
    x = _images(n, size, seed=5)
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(5))
    probe = [r["label"] for r in model.predict(x, "probe")["probe"]]
    return [(x[i], probe[i] if i % 3 == 0 else int(labels[i])) for i in range(n)]


def test_evaluate_takes_ensembles(built: tuple) -> None:
    model, size = built
    data = _dataset(model, size)
    metrics = mtp.tasks.evaluate_tasks(model, ["vote", "late"], data, batch_size=5, progress=False)
    x = torch.stack([image for image, _ in data])
    labels = torch.tensor([t for _, t in data])
    probs = torch.stack([_logits(model.predict(x, m)[m]).softmax(-1) for m in ("late", "ssf", "probe")]).mean(0)
    assert metrics["vote"]["top1"] == pytest.approx(float((probs.argmax(-1) == labels).float().mean()))
    assert metrics["vote"]["num_images"] == len(data)
    assert mtp.tasks.evaluate(model, "vote", data, progress=False)["top1"] == metrics["vote"]["top1"]


def test_disagreement_counts_what_it_says(built: tuple) -> None:
    model, size = built
    data = _dataset(model, size)
    x = torch.stack([image for image, _ in data])
    target = torch.tensor([t for _, t in data])
    members = ("late", "ssf", "probe")
    labels = {m: torch.tensor([r["label"] for r in model.predict(x, m)[m]]) for m in members}
    right = torch.stack([labels[m] == target for m in members])  # (K, N)
    ensemble = torch.tensor([r["label"] for r in model.predict(x, "vote")["vote"]])
    report = disagreement(model, "vote", data, batch_size=5, progress=False)
    assert report["members"] == list(members) and report["mode"] == "mean_prob" and report["num_images"] == 12
    for k, m in enumerate(members):
        assert report["accuracy"][m] == pytest.approx(float(right[k].float().mean()))
        assert report["metrics"][m]["top1"] == pytest.approx(report["accuracy"][m])
    assert report["ensemble_accuracy"] == pytest.approx(float((ensemble == target).float().mean()))
    assert report["metrics"]["vote"]["top1"] == pytest.approx(report["ensemble_accuracy"])
    some, every = right.any(0), right.all(0)
    assert report["oracle"] == pytest.approx(float(some.float().mean()))
    assert report["different_mistakes"] == pytest.approx(float((some & ~every).float().mean()))
    assert report["all_wrong"] == pytest.approx(float((~some).float().mean()))
    assert 0 < report["different_mistakes"] < 1  # the data makes them err differently: the counts are exercised
    for a, b in (("late", "ssf"), ("late", "probe"), ("ssf", "probe")):
        expected = float((labels[a] != labels[b]).float().mean())
        assert report["pairwise_disagreement"][f"{a}/{b}"] == pytest.approx(expected)
    best = max(members, key=lambda m: report["accuracy"][m])
    assert report["best_member"] == best
    assert report["gain_over_best"] == pytest.approx(report["ensemble_accuracy"] - report["accuracy"][best])
    # a list of tasks: the same numbers, the ensemble combined in the analysis
    listed = disagreement(model, list(members), data, progress=False)
    for key in ("accuracy", "ensemble_accuracy", "oracle", "different_mistakes", "pairwise_disagreement"):
        assert listed[key] == pytest.approx(report[key]), key
    with pytest.raises(ValueError, match="mode 'mean_prob'; got mode='mean_logit'"):
        disagreement(model, "vote", data, mode="mean_logit")
    with pytest.raises(ValueError, match="classification tasks.*'segmentation'"):
        disagreement(model, "seg", data)
    with pytest.raises(ValueError, match="unknown ensemble 'nope'"):
        disagreement(model, "nope", data)
    with pytest.raises(ValueError, match="'five' has 5"):
        disagreement(model, ["late", "five"], data)


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, members, mode, error, match",
    [
        ("e", ["late", "five"], "mean_prob", ValueError, "label space.*'late' has num_classes 4 and 'five' has 5"),
        ("e", ["ssf", "named"], "mean_prob", ValueError, r"class_names \['w', 'x', 'y', 'z'\] and 'named' has"),
        ("e", ["seg1", "late"], "mean_prob", ValueError, "'seg1' has output kind 'segmentation' and 'late' has"),
        ("e", ["late", "boxes"], "mean_prob", ValueError, "'boxes' makes 'detection'.*combine classification"),
        ("e", ["late", "nope"], "mean_prob", ValueError, r"unknown member task\(s\) \['nope'\]; tasks: \['late'"),
        ("e", ["late", "vote"], "mean_prob", ValueError, r"ensembles of ensembles.*members=\['late', 'ssf', 'probe'"),
        ("e", ["late", "late"], "mean_prob", ValueError, r"\['late'\] are listed more than once"),
        ("e", ["late"], "mean_prob", ValueError, "at least two member tasks"),
        ("e", "late", "mean_prob", TypeError, "members must be a list of task names, got 'late'"),
        ("e", ["late", "ssf"], "max", ValueError, r"mode must be one of \('mean_prob', 'mean_logit'\).*'max'"),
        ("late", ["ssf", "probe"], "mean_prob", ValueError, "'late' is a task; tasks and ensembles share"),
        ("vote", ["ssf", "probe"], "mean_prob", ValueError, "ensemble 'vote' already exists"),
        ("Bad Name", ["ssf", "probe"], "mean_prob", ValueError, "task name must match"),
    ],
)
def test_bad_ensembles_leave_the_model_unchanged(pristine: tuple, name, members, mode, error, match) -> None:  # noqa: ANN001
    model, x, before = copy.deepcopy(pristine)
    with pytest.raises(error, match=match):
        model.add_ensemble(name, members, mode)
    assert model.ensembles == ["vote"]
    after = model.predict(x, ["vote", "late"])
    for t in before:
        torch.testing.assert_close(_logits(after[t]), _logits(before[t]))


@pytest.fixture(scope="module")
def pristine() -> tuple[mtp.MultiTaskModel, torch.Tensor, dict]:
    """A model with one ensemble, images, and its results (each test changes a copy)."""
    model, size = build()
    model.add_ensemble("vote", ["late", "ssf", "probe"])
    x = _images(2, size, seed=6)
    return model, x, model.predict(x, ["vote", "late"])


def test_names_are_shared_and_members_stay(built: tuple) -> None:
    model, size = build()
    model.add_ensemble("vote", ["late", "ssf"])
    version = model.version
    with pytest.raises(ValueError, match=r"task 'late' is a member of ensemble\(s\) \['vote'\]; remove_ensemble"):
        model.remove_task("late")
    assert "late" in model.tasks and model.version == version
    with pytest.raises(ValueError, match="'vote' is an ensemble; tasks and ensembles share one name space"):
        model.add_task("vote", _cls(), [])
    task = model.build_task("other", _cls(), [])
    task.name = "vote"
    with pytest.raises(ValueError, match="'vote' is an ensemble"):
        model.attach_task(task)
    with pytest.raises(ValueError, match=r"'vote' is an ensemble \(of \['late', 'ssf'\]\), not a task"):
        model.trainable_parameters("vote")
    with pytest.raises(ValueError, match=r"unknown task 'nope'; tasks: .*, ensembles: \['vote'\]"):
        model.predict(_images(1, size), ["vote", "nope"])
    counts = model.num_parameters("vote")
    assert counts == {k: model.num_parameters("late")[k] + model.num_parameters("ssf")[k] for k in counts}
    model.remove_ensemble("vote")
    model.remove_task("late")
    assert model.ensembles == [] and "late" not in model.tasks
    with pytest.raises(ValueError, match="unknown ensemble 'vote'; ensembles: \\[\\]"):
        model.remove_ensemble("vote")


def test_save_and_load_an_ensemble(built: tuple, tmp_path) -> None:  # noqa: ANN001
    model, size = built
    model.save_task("vote", tmp_path / "vote")
    assert sorted(p.name for p in (tmp_path / "vote").iterdir()) == [ENSEMBLE_CONFIG]  # no weights
    saved = json.loads((tmp_path / "vote" / ENSEMBLE_CONFIG).read_text())
    assert saved["members"] == ["late", "ssf", "probe"] and saved["mode"] == "mean_prob"
    for m in ("late", "ssf", "probe"):
        model.save_task(m, tmp_path / m)
    fresh, _ = make_model("vit")
    with pytest.raises(ValueError, match=r"unknown member task\(s\) \['late', 'ssf', 'probe'\]"):
        fresh.load_task(tmp_path / "vote")  # members first
    assert fresh.ensembles == []
    with pytest.raises(ValueError, match="holds an ensemble, not a task"):
        fresh.read_task(tmp_path / "vote")
    for m in ("late", "ssf", "probe"):
        fresh.load_task(tmp_path / m)
    loaded = fresh.load_task(tmp_path / "vote", name="again")
    assert loaded.name == "again" and fresh.ensembles == ["again"] and loaded.mode == "mean_prob"
    x = _images(3, size, seed=7)
    torch.testing.assert_close(_logits(fresh.predict(x, "again")["again"]), _logits(model.predict(x, "vote")["vote"]))
    with pytest.raises(ValueError, match="no head of its own"):
        fresh.load_task(tmp_path / "vote", head=_cls())
