"""Run reports with figures (multitask_peft.report): curves, galleries and confusion matrices beside report.md, the
self-contained report.html, and `mtpeft eval` refreshing them; on one tiny trained run of three MultiFashion tasks."""

from __future__ import annotations

import base64
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from test_run import _config

from multitask_peft import report as rp
from multitask_peft.cli import main
from multitask_peft.run import format_report
from multitask_peft.rundir import RunDirectory
from multitask_peft.tasks.data import MultiFashionConfig, generate_multifashion

fashion = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not fashion.is_file(), reason="needs Debian's dataset-fashion-mnist")
pytest.importorskip("matplotlib", reason="report figures need the `report` extra (matplotlib)")

PNG = b"\x89PNG\r\n\x1a\n"
KINDS = {"garment": "classification", "boxes": "detection", "masks": "segmentation"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: 4 steps of the three tasks, logged every step (so every curve has points), no export."""
    if not fashion.is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "mf"
    generate_multifashion(
        root,
        MultiFashionConfig(num_scenes=(8, 4, 4), num_crops=(20, 12, 8), image_size=64, crop_size=32, workers=1),
        progress=False,
    )
    config = _config(root, tmp / "run")  # the end-to-end run's three tasks, shorter, logged every step, no export
    config["train"] = {"steps": 4, "batch_size": 4, "log_every": 1, "tensorboard": False, "progress": False}
    del config["export"]
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["train", str(path)])
    return tmp / "run"


def _figures(run: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((run / "figures").glob("*.png"))}


def _images_in_markdown(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@needs_fashion
def test_train_writes_figures(run: Path) -> None:
    figures = _figures(run)
    expected = {f"{task}_{suffix}" for task in KINDS for suffix in ("curves", "gallery")} | {"garment_confusion"}
    assert set(figures) == expected
    for path in figures.values():
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


@needs_fashion
def test_markdown_embeds_every_figure(run: Path) -> None:
    text = (run / "report.md").read_text()
    links = _images_in_markdown(text)
    assert len(links) == len(_figures(run)) and all(not Path(link).is_absolute() for link in links)
    assert {(run / link).resolve() for link in links} == {p.resolve() for p in _figures(run).values()}
    report = json.loads((run / "report.json").read_text())
    assert text.startswith(format_report(report))  # the metrics table first, then a section per task
    for task in KINDS:
        assert f"\n## {task}\n" in text


@needs_fashion
def test_html_is_self_contained(run: Path) -> None:
    parser = _Images()
    parser.feed((run / "report.html").read_text())
    parser.close()
    assert len(parser.sources) == len(_figures(run))
    prefix = "data:image/png;base64,"
    for source in parser.sources:
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :], validate=True).startswith(PNG)
    text = " ".join(parser.text)
    for task in KINDS:
        assert task in text
    assert "top1" in text and "map50" in text and "miou" in text


@needs_fashion
def test_confusion_matrix_comes_from_the_evaluation(run: Path) -> None:
    """report.json's counts (true class x predicted class) are those of the pass that measured top-1."""
    row = json.loads((run / "report.json").read_text())["tasks"]["garment"]
    counts = torch.tensor(row["confusion"])
    assert counts.shape == (10, 10) and int(counts.sum()) == row["metrics"]["num_images"] == 12
    assert float(counts.trace()) / 12 == pytest.approx(row["metrics"]["top1"])
    directory = RunDirectory(run)
    spec = directory.config.tasks["garment"].data
    dataset = spec.dataset(spec.eval_split, train=False, backbone=directory.build_backbone().data_config)
    assert counts.sum(1).tolist() == [sum(1 for _, y in dataset if y == k) for k in range(10)]
    assert "confusion" not in json.loads((run / "report.json").read_text())["tasks"]["boxes"]
    counter = rp.ConfusionCounter(3)
    counter([{"label": 0}, {"label": 2}, {"label": 2}], torch.tensor([0, 1, 2]))
    assert counter.counts.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_curves_from_log(tmp_path: Path) -> None:
    """Losses and learning rates per logged step; evaluations (records with `eval`) add a panel when there are
    two or more."""
    log = [
        {"step": 10, "loss": {"a": 2.0, "b": 1.0}, "lr": {"peft_decay": 1e-3, "head_decay": 1e-3}},
        {"step": 20, "loss": {"b": 0.5}, "lr": {"peft_decay": 5e-4, "head_decay": 5e-4}},
        {"step": 20, "eval": {"b": {"top1": 0.5}}},
        {"step": 30, "loss": {"a": 1.0, "b": 0.4}, "lr": {"b/peft_decay": 1e-4, "b/head_decay": 2e-4, "a/x": 1.0}},
        {"step": 30, "eval": {"b": {"top1": 0.7, "top5": 0.9}}},
    ]
    curves = rp.read_curves(log, "b")
    assert curves["loss"] == [(10, 1.0), (20, 0.5), (30, 0.4)]
    assert curves["lr"]["head_decay"] == [(10, 1e-3), (20, 5e-4), (30, 2e-4)]
    assert "x" not in curves["lr"] and rp.read_curves(log, "a")["lr"]["x"] == [(30, 1.0)]  # another task's group
    assert curves["eval"] == {"top1": [(20, 0.5), (30, 0.7)], "top5": [(30, 0.9)]}
    assert rp.read_curves(log, "a")["loss"] == [(10, 2.0), (30, 1.0)]  # tasks drawn only on some steps
    assert rp.plot_curves(curves, "b", "top1", tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes().startswith(PNG)
    assert not rp.plot_curves(rp.read_curves(log, "c"), "c", "top1", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


@needs_fashion
def test_without_matplotlib_the_report_is_written_and_a_warning_names_the_extra(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = json.loads((run / "report.json").read_text())
    directory = RunDirectory(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec answers None: as if not installed
    with pytest.raises(ImportError, match=r"pip install 'multitask-peft\[report\]'"):
        rp.require_matplotlib()
    with pytest.warns(UserWarning, match=r"multitask-peft\[report\].*without figures"):
        figures = rp.write_report_files(report, format_report(report), tmp_path, object(), directory.config)
    assert figures == {} and not (tmp_path / "figures").exists()
    assert _images_in_markdown((tmp_path / "report.md").read_text()) == []
    assert "<img" not in (tmp_path / "report.html").read_text() and "garment" in (tmp_path / "report.html").read_text()


@needs_fashion
def test_eval_refreshes_the_report(run: Path, capsys: pytest.CaptureFixture) -> None:
    """`mtpeft eval RUN` redraws every figure, report.md and report.html, drops figures of tasks no longer in the
    run, and keeps the training time of report.json."""
    before = json.loads((run / "report.json").read_text())
    (run / "figures" / "boxes_gallery.png").unlink()
    (run / "figures" / "removed_task_curves.png").write_bytes(PNG)
    (run / "report.html").unlink()
    (run / "report.md").write_text("stale\n")
    stamps = {name: path.stat().st_mtime_ns for name, path in _figures(run).items()}
    capsys.readouterr()
    main(["eval", str(run)])
    assert "refreshed" in capsys.readouterr().out
    figures = _figures(run)
    assert "boxes_gallery" in figures and "removed_task_curves" not in figures
    assert all(figures[name].stat().st_mtime_ns > stamp for name, stamp in stamps.items() if name in figures)
    assert len(_images_in_markdown((run / "report.md").read_text())) == len(figures)
    assert (run / "report.html").read_text().count("data:image/png;base64,") == len(figures)
    after = json.loads((run / "report.json").read_text())
    assert after["train_time_s"] == before["train_time_s"]
    assert {t: r["value"] for t, r in after["tasks"].items()} == {t: r["value"] for t, r in before["tasks"].items()}
