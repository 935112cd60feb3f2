"""Ensembles outside eager predict: the ONNX graph (an in-graph output, parity with PyTorch and with the mean of the
members), served by name over HTTP (torch and ONNX backends; the adapter store keeps members resident, evicts and
refuses to unload them), run configs and run directories."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_ensembles import _images, _logits, _routed_logits, build

import multitask_peft as mtp
from conftest import make_model
from multitask_peft.ensemble import ENSEMBLE_CONFIG
from multitask_peft.run_config import RunConfig, build_model

ONNX_TASKS = ["vote", "avg", "seg", "late"]  # ssf, probe, seg1, seg2 run for the ensembles only


@pytest.fixture(scope="module")
def model() -> tuple[mtp.MultiTaskModel, int]:
    model, size = build()
    model.add_ensemble("vote", ["late", "ssf", "probe"])
    model.add_ensemble("avg", ["late", "ssf", "probe"], mode="mean_logit")
    model.add_ensemble("seg", ["seg1", "seg2"])
    return model, size


@pytest.fixture(scope="module")
def exported(model: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m, size = model
    return mtp.export_onnx(m, tmp_path_factory.mktemp("onnx") / "ens.onnx", ONNX_TASKS, size, optimize=False)


def test_onnx_ensemble_equals_pytorch_and_the_mean_of_its_members(model: tuple, exported: Path) -> None:
    m, size = model
    runner = mtp.OnnxRunner(exported)
    assert runner.tasks == ONNX_TASKS
    assert sorted(o.name for o in runner.session.get_outputs()) == [
        "avg.logits",
        "late.logits",
        "seg.mask",
        "vote.logits",
    ]
    meta = runner.meta["tasks"]
    assert meta["vote"]["ensemble"] == {"members": ["late", "ssf", "probe"], "mode": "mean_prob"}
    assert meta["avg"]["ensemble"]["mode"] == "mean_logit" and "peft" not in meta["vote"]
    assert (
        meta["vote"]["head_config"]["class_names"] == ["w", "x", "y", "z"] and meta["seg"]["output"] == "segmentation"
    )
    x = _images(4, size, seed=11)
    got = runner.predict(x)
    expected = m.predict(x, ONNX_TASKS)
    for name in ("vote", "avg", "late"):
        torch.testing.assert_close(_logits(got[name]), _logits(expected[name]), atol=1e-4, rtol=1e-4)
        assert [r["label"] for r in got[name]] == [r["label"] for r in expected[name]]
    members = torch.stack([_logits(m.predict(x, t)[t]) for t in ("late", "ssf", "probe")])  # (K, N, C)
    torch.testing.assert_close(_logits(got["vote"]).exp(), members.softmax(-1).mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(got["avg"]), members.mean(0), atol=1e-4, rtol=1e-4)
    probs = torch.stack([_routed_logits(m, t, x).softmax(1) for t in ("seg1", "seg2")]).mean(0)  # (N, C, H, W)
    mask = torch.stack([r["mask"] for r in got["seg"]])
    assert (mask == probs.argmax(1)).float().mean() >= 0.999


def test_onnx_refuses_what_it_cannot_export(model: tuple, tmp_path: Path) -> None:
    m, size = model
    with pytest.raises(ValueError, match=r"\['vote'\] are ensembles: merge=True folds tasks"):
        mtp.export_onnx(m, tmp_path / "x.onnx", ["vote"], size, merge=True)
    prompted, _ = make_model("vit")
    prompted.add_task("a", mtp.tasks.Classification(num_classes=2), [mtp.peft.VPT(num_tokens=2)])
    prompted.add_task("b", mtp.tasks.Classification(num_classes=2), [])
    prompted.add_ensemble("e", ["a", "b"])
    with pytest.raises(ValueError, match="task 'a' cannot be exported to ONNX"):
        mtp.export_onnx(prompted, tmp_path / "x.onnx", ["e"], size)
    assert not any(tmp_path.iterdir())


# --- serving ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(model: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every task and ensemble of the model saved as the adapter store's folders."""
    m, _ = model
    root = tmp_path_factory.mktemp("store") / "tasks"
    for name in [*m.tasks, *m.ensembles]:
        m.save_task(name, root / name)
    return root


def test_served_ensemble_equals_predict(model: tuple, root: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from test_serving import TOKEN, LiveServer, _engine, _png, _tensor

    from multitask_peft import serving

    m, _ = model
    shutil.copytree(root, tmp_path / "tasks")
    root = tmp_path / "tasks"
    png = _png(seed=21)
    expected = m.predict(_tensor(png)[None], ["vote", "seg", "late"])
    with LiveServer(_engine(root, max_batch=4)) as live, serving.Client(live.url, admin_token=TOKEN) as client:
        listed = {t["name"]: t for t in client.tasks()}
        assert listed["vote"]["ensemble"] == {"members": ["late", "ssf", "probe"], "mode": "mean_prob"}
        assert listed["vote"]["class_names"] == ["w", "x", "y", "z"] and listed["seg"]["head"] == "segmentation"
        out = client.predict(png, ["vote", "seg", "late"], logits=True)
        results = out["results"]
        torch.testing.assert_close(
            torch.tensor(results["vote"]["logits"]), _logits(expected["vote"])[0], atol=1e-4, rtol=1e-4
        )
        assert results["vote"]["label"] == expected["vote"][0]["label"]
        assert results["vote"]["class_name"] == "wxyz"[results["vote"]["label"]]
        mask = serving.decode_mask_png(results["seg"]["mask_png"])
        assert (mask == expected["seg"][0]["mask"].numpy()).mean() >= 0.999
        assert out["versions"] == {"vote": 1, "seg": 1, "late": 1}
        with pytest.raises(serving.ServerError) as err:  # a member cannot leave while an ensemble uses it
            client.unload_task("ssf")
        assert err.value.status == 409 and "'vote'" in err.value.message and "'avg'" in err.value.message
        client.unload_task("vote")
        client.unload_task("avg")
        client.unload_task("ssf")
        with pytest.raises(serving.ServerError) as err:  # its member is gone
            client.load_task("vote")
        assert err.value.status == 400 and "unknown member task(s) ['ssf']" in err.value.message
        info = client.load_task("seg", name="seg-again")  # an ensemble folder, loaded live under another name
        assert info["ensemble"]["members"] == ["seg1", "seg2"]
        again = client.predict(png, ["seg-again"])["results"]["seg-again"]
        assert (serving.decode_mask_png(again["mask_png"]) == mask).mean() >= 0.999
        with pytest.raises(serving.ServerError) as err:
            client.load_task("seg", name="late")  # an ensemble may not replace a task
        assert err.value.status == 400 and "'late' is a task already served" in err.value.message


def test_store_keeps_members_resident_and_evicts_ensembles_with_them(model: tuple, root: Path) -> None:
    pytest.importorskip("fastapi")
    from multitask_peft import serving

    m, size = model
    served, _ = make_model("vit")
    store = serving.AdapterStore(served, root, max_resident=3)
    store.scan()
    assert served.tasks == ["boxes", "five", "late"]  # the first three task folders
    x = _images(2, size, seed=12)

    def run(names: list[str]) -> dict:
        asyncio.run(store.make_resident(names))
        return served.predict(x, names)

    out = run(["vote"])
    assert set(served.tasks) == {"late", "ssf", "probe"} and served.ensembles == ["vote"]
    torch.testing.assert_close(_logits(out["vote"]), _logits(m.predict(x, "vote")["vote"]))
    run(["seg"])  # two of vote's members make room: vote leaves the model with them
    assert "vote" not in served.ensembles and {"seg1", "seg2"} <= set(served.tasks) and len(served.tasks) == 3
    assert not store.entries["vote"].resident and store.resident_count() == 3
    out = run(["vote", "late"])
    torch.testing.assert_close(_logits(out["vote"]), _logits(m.predict(x, "vote")["vote"]))
    small = serving.AdapterStore(make_model("vit")[0], root, max_resident=2)
    small.scan(validate=False)
    with pytest.raises(serving.ServingError, match=r"at most 2 tasks .*an ensemble counts its members.*got 3"):
        small.acquire(["vote"])


def test_onnx_backend_serves_ensembles(model: tuple, exported: Path) -> None:
    pytest.importorskip("fastapi")
    from test_serving import LiveServer, _png, _tensor

    from multitask_peft import serving

    m, _ = model
    png = _png(seed=22)
    expected = m.predict(_tensor(png)[None], ["vote"])["vote"][0]
    engine = serving.Engine(serving.OnnxBackend(exported))
    with LiveServer(engine) as live, serving.Client(live.url) as client:
        assert {t["name"]: t.get("ensemble") for t in client.tasks()}["avg"]["mode"] == "mean_logit"
        result = client.predict(png, ["vote"], logits=True)["results"]["vote"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected["logits"], atol=1e-4, rtol=1e-4)
    assert result["label"] == expected["label"]


# --- run configs and run directories ----------------------------------------------------------------------------


def _run_config(out: Path, ensembles: dict, three: bool = False) -> dict:
    data = {"source": "imagefolder", "root": str(out / "data"), "image_size": 32, "augment": "none"}
    head = {"type": "classification", "num_classes": 2}
    return {
        "backbone": {"name": "test_efficientnet"},
        "tasks": {
            "lora": {"head": head, "peft": [{"method": "lora", "r": 2}], "data": data},
            "bitfit": {"head": head, "peft": [{"method": "bitfit"}], "data": data},
            "probe": {"head": head, "data": data},
            **({"three": {"head": {**head, "num_classes": 3}, "data": data}} if three else {}),
        },
        "ensembles": ensembles,
        "train": {"steps": 2, "batch_size": 4, "tensorboard": False, "progress": False, "checkpoint_every": 100},
        "output": str(out / "run"),
    }


@pytest.mark.parametrize(
    "ensembles, match",
    [
        ({"e": {"members": ["lora", "three"]}}, "'lora' has num_classes 2 and 'three' has 3"),
        ({"e": {"members": ["lora", "nope"]}}, r"unknown member task\(s\) \['nope'\]"),
        ({"lora": {"members": ["bitfit", "probe"]}}, "ensemble 'lora' has the name of a task"),
        ({"e": {"members": ["lora", "bitfit"]}, "f": {"members": ["e", "probe"]}}, "ensembles of ensembles"),
        ({"e": {"members": ["lora", "bitfit"], "mode": "vote"}}, "`mode` must be one of"),
        ({"e": {"members": ["lora", "bitfit"], "weights": [1, 2]}}, r"unknown key\(s\) \['weights'\]"),
        ({"e": {"mode": "mean_prob"}}, r"missing key\(s\) \['members'\]"),
    ],
)
def test_run_config_ensembles_are_checked(tmp_path: Path, ensembles: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(_run_config(tmp_path, ensembles, three=True))


def _image_folder(root: Path) -> None:
    """Two classes of tiny PNGs (bright and dark) in train/ and val/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 5)):
        for label, base in (("dark", 40), ("bright", 200)):
            (root / split / label).mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{k}.png")


def test_train_evaluate_and_reload_a_run_with_an_ensemble(tmp_path: Path) -> None:
    """`mtpeft train` with an `ensembles:` section: the ensemble is saved next to its members, has a report row
    (with the disagreement analysis), comes back with the run directory, is exported, offered by `mtpeft predict`
    and served."""
    from multitask_peft.cli import main
    from multitask_peft.rundir import RunDirectory

    _image_folder(tmp_path / "data")
    ensembles = {
        "vote": {"members": ["lora", "bitfit", "probe"]},
        "avg": {"members": ["lora", "probe"], "mode": "mean_logit"},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(tmp_path, ensembles), sort_keys=False))
    main(["train", str(config)])
    run = RunDirectory(tmp_path / "run")
    assert (run.tasks_dir / "vote" / ENSEMBLE_CONFIG).is_file() and (run.tasks_dir / "avg" / ENSEMBLE_CONFIG).is_file()
    assert run.config.ensembles["avg"].mode == "mean_logit"
    report = json.loads((run.path / "report.json").read_text())
    row = report["tasks"]["vote"]
    assert row["members"] == ["lora", "bitfit", "probe"] and row["metric"] == "top1"
    assert row["peft_params"] == sum(report["tasks"][t]["peft_params"] for t in ("lora", "bitfit", "probe"))
    analysis = row["analysis"]
    assert analysis["num_images"] == 10 and analysis["ensemble_accuracy"] == pytest.approx(row["value"])
    assert set(analysis["pairwise_disagreement"]) == {"lora/bitfit", "lora/probe", "bitfit/probe"}
    assert "different mistakes" in (run.path / "report.md").read_text()
    model = run.load_model()
    assert model.ensembles == ["vote", "avg"]
    from multitask_peft.run import evaluate_ensemble

    again = evaluate_ensemble(model, run.config, "vote")
    assert again["value"] == pytest.approx(row["value"]) and again["analysis"]["oracle"] == pytest.approx(
        analysis["oracle"]
    )
    # mtpeft predict offers the ensembles of the run directory
    from multitask_peft.serving.predict import load_predictor

    predictor = load_predictor(run.path, device="cpu")
    assert {"vote", "avg"} <= set(predictor.tasks) and predictor.tasks["vote"].kind == "classification"
    image = next((tmp_path / "data" / "val" / "dark").iterdir())
    main(
        ["predict", str(run.path), str(image), "--tasks", "vote,lora", "--out", str(tmp_path / "pred"), "--no-pictures"]
    )
    line = json.loads((tmp_path / "pred" / "results.jsonl").read_text().splitlines()[0])
    assert set(line["tasks"]) == {"vote", "lora"} and len(line["tasks"]["vote"]["top5"]) == 2
    # a served run directory serves them too
    pytest.importorskip("fastapi")
    from multitask_peft import serving

    backend = serving.torch_backend(run.path, device="cpu")
    assert backend.served_tasks()["avg"]["ensemble"] == {"members": ["lora", "probe"], "mode": "mean_logit"}


def test_export_run_includes_ensembles_of_exported_tasks(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from multitask_peft.run import export_run

    config = RunConfig.from_dict(_run_config(tmp_path, {"vote": {"members": ["lora", "probe"]}}))
    model = build_model(config)
    assert model.ensembles == ["vote"]
    path = export_run(model, config, tmp_path / "m.onnx", optimize=False, check=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert list(meta["tasks"]) == ["lora", "bitfit", "probe", "vote"] and meta["input"]["size"] == [32, 32]
