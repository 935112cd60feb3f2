"""`mtpeft sweep`: lists of candidates expand to one task per configuration, trained together on one stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multitask_peft.cli import main
from multitask_peft.config import ConfigError
from multitask_peft.rundir import RunDirectory
from multitask_peft.sweep import expand_sweep
from multitask_peft.task_io import WEIGHTS_NAME


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    """Two splits of tiny images whose class shows in their colour (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(rng.normal(colour, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


def _sweep(root: Path, out: Path, peft: list, train: dict | None = None) -> dict:
    return {
        "backbone": {"name": "test_efficientnet"},
        "tasks": {
            "colour": {
                "head": {"type": "classification", "num_classes": 2},
                "peft": peft,
                "data": {"source": "imagefolder", "root": str(root), "image_size": 32},
            }
        },
        "train": {
            "steps": 4,
            "batch_size": 4,
            "tensorboard": False,
            "progress": False,
            "clip_norm": 0.5,
            "checkpoint_every": 4,
            **(train or {}),
        },
        "sweep": {"holdout": 0.25},
        "output": str(out),
    }


def test_expansion_names_settings_and_streams(tmp_path: Path) -> None:
    peft = [
        [{"method": "lora", "r": [2, 4], "targets": {"sweep": [["conv_pw"], ["conv_pw", "conv_pwl"]]}}],
        [],
        [{"method": "ssf"}],
    ]
    config, members, spec = expand_sweep(_sweep(tmp_path, tmp_path / "o", peft, {"lr": [1e-3, 3e-3]}))
    assert len(members) == (4 + 1 + 1) * 2 and spec.holdout == 0.25
    assert [m.name for m in members][:3] == ["colour-00", "colour-01", "colour-02"]
    assert list(config.tasks) == [m.name for m in members]
    first = members[0]
    assert first.family == "lora" and first.settings == {"lora.r": 2, "lora.targets": ["conv_pw"], "lr": 1e-3}
    assert {m.family for m in members} == {"lora", "linear_probe", "ssf"}
    task = config.tasks["colour-03"]
    assert task.peft[0].r == 2 and tuple(task.peft[0].targets) == ("conv_pw", "conv_pwl") and task.lr == 3e-3
    assert all(t.stream == "colour" and t.data.holdout == 0.25 for t in config.tasks.values())
    assert config.train.clip_scope == "task"


def test_unsweepable_lists_are_all_reported(tmp_path: Path) -> None:
    data = _sweep(tmp_path, tmp_path / "o", [{"method": "lora", "r": [2, 4]}], {"steps": [2, 4], "tasks_per_step": 1})
    data["tasks"]["colour"]["data"]["image_size"] = [32, 64]
    data["tasks"]["colour"]["head"]["num_classes"] = [2, 3]
    with pytest.raises(ConfigError) as err:
        expand_sweep(data)
    paths = [p for p, _ in err.value.errors]
    assert paths == [
        "train.steps",
        "train.tasks_per_step",
        "tasks.colour.head.num_classes",
        "tasks.colour.data.image_size",
    ], err.value.errors
    assert "cannot be swept" in str(err.value) and "lr, head_lr, weight_decay" in str(err.value)
    data = _sweep(tmp_path, tmp_path / "o", [{"method": "lora", "r": list(range(1, 80))}])
    with pytest.raises(ConfigError, match="more than sweep.max_configs=64"):
        expand_sweep(data)
    data = _sweep(tmp_path, tmp_path / "o", [{"method": "lora", "r": [2, 0]}])
    with pytest.raises(ConfigError, match=r"tasks\.colour\.peft.*configuration colour-1"):
        expand_sweep(data)  # errors of an expanded configuration name the sweep config's task


def test_sweep_trains_like_alone_and_selects_on_holdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    _image_folder(root, {"train": 12, "val": 6})
    peft = [[{"method": "lora", "r": [2, 4]}], [{"method": "ssf"}]]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(_sweep(root, tmp_path / "sweep", peft, {"lr": [1e-3, 3e-2]})))
    main(["sweep", str(sweep)])
    out = tmp_path / "sweep"
    results = json.loads((out / "sweep.json").read_text())["tasks"]["colour"]
    assert len(results["configs"]) == 6 and results["holdout_images"] == 6 and results["eval_images"] == 12
    best = results["best"]
    by_name = {c["name"]: c for c in results["configs"]}
    assert by_name[best]["holdout"] == max(c["holdout"] for c in results["configs"])
    tested = {c["name"] for c in results["configs"] if "eval" in c}
    assert tested == {best, *results["best_by_family"].values()}  # only the chosen ones see the evaluation split
    assert (out / "figures" / "sweep_colour.png").read_bytes().startswith(b"\x89PNG")
    assert (
        "| configuration |" in (out / "sweep.md").read_text() and "sweep_colour.png" in (out / "sweep.md").read_text()
    )
    assert (out / "sweep.yaml").is_file() and RunDirectory(out).config.tasks.keys() == by_name.keys()

    # the same configuration (LoRA r=4, lr 0.03) trained alone: the same weights as inside the sweep
    alone = tmp_path / "alone.yaml"
    alone.write_text(yaml.safe_dump(_sweep(root, tmp_path / "alone", [{"method": "lora", "r": 4}], {"lr": 3e-2})))
    main(["sweep", str(alone)])
    swept = next(c["name"] for c in results["configs"] if c["settings"] == {"lora.r": 4, "lr": 3e-2})
    from safetensors.torch import load_file

    a = load_file(str(out / "tasks" / swept / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "alone" / "tasks" / "colour-0" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    other = next(c["name"] for c in results["configs"] if c["settings"] == {"lora.r": 4, "lr": 1e-3})
    c = load_file(str(out / "tasks" / other / WEIGHTS_NAME))  # same init and batches, other lr
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4
    alone_results = json.loads((tmp_path / "alone" / "sweep.json").read_text())["tasks"]["colour"]["configs"][0]
    assert alone_results["holdout"] == pytest.approx(by_name[swept]["holdout"])


def test_a_diverging_configuration_is_dropped_and_never_chosen(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image_folder(root, {"train": 12, "val": 6})
    sweep = tmp_path / "sweep.yaml"  # lr 1e30: the weights blow up after one step, the next loss is not finite
    sweep.write_text(yaml.safe_dump(_sweep(root, tmp_path / "sweep", [{"method": "ssf"}], {"lr": [1e-3, 1e30]})))
    main(["sweep", str(sweep)])
    out = tmp_path / "sweep"
    results = json.loads((out / "sweep.json").read_text())["tasks"]["colour"]
    by_lr = {c["settings"]["lr"]: c for c in results["configs"]}
    assert by_lr[1e30]["diverged_at_step"] == 2 and "diverged_at_step" not in by_lr[1e-3]
    assert results["best"] == by_lr[1e-3]["name"] and results["best_by_family"] == {"ssf": by_lr[1e-3]["name"]}
    assert "eval" in by_lr[1e-3] and "eval" not in by_lr[1e30]
    assert "(diverged at step 2: not chosen)" in (out / "sweep.md").read_text()
    assert (out / "figures" / "sweep_colour.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and log[-1]["diverged"] == {by_lr[1e30]["name"]: 2}
