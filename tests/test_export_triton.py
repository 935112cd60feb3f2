"""Self-describing ONNX exports (`metadata_props`) and Triton Inference Server model repositories
(`write_triton_repo`, `mtpeft export --triton-repo`): checked against the graph itself, read back with ONNX Runtime
and, where tritonclient is installed, with Triton's own `ModelConfig` protobuf."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import multitask_peft as mtp  # noqa: E402
from conftest import make_model, randomize  # noqa: E402
from multitask_peft.export import read_metadata, sidecar_from_metadata, sidecar_path, write_triton_repo  # noqa: E402
from multitask_peft.export.metadata import write_metadata  # noqa: E402

#: Class names a labels file and a text-format string must carry as they are (quote, backslash, non-ASCII).
CLASS_NAMES = ("plain", 'say "hi"', "back\\slash", "café")
ORT_TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[mtp.MultiTaskModel, int, Path]:
    """Classification (two tasks and their ensemble), detection and segmentation in one graph, dynamic batch."""
    model, size = make_model("vit")
    head = mtp.tasks.Classification(num_classes=4, class_names=CLASS_NAMES)
    model.add_task("cls", head=head, peft=[mtp.peft.SSF()])
    model.add_task("cls2", head=mtp.tasks.Classification(num_classes=4, class_names=CLASS_NAMES), peft=[])
    model.add_task("boxes", head=mtp.tasks.Detection(num_classes=2, class_names=("hat", "sock")), peft=[mtp.peft.SSF()])
    model.add_task("masks", head=mtp.tasks.Segmentation(num_classes=3), peft=[mtp.peft.LoRA(r=2)])
    model.add_ensemble("vote", ["cls", "cls2"])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k)
    path = tmp_path_factory.mktemp("export") / "multi.onnx"
    mtp.export_onnx(model, path, image_size=size, optimize=False, check=False)
    return model, size, path


def _metadata(path: Path) -> dict[str, str]:
    return dict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)


def test_metadata_props_round_trip_the_sidecar(exported: tuple) -> None:
    model, size, path = exported
    sidecar = json.loads(sidecar_path(path).read_text())
    props = _metadata(path)  # what a plain ONNX Runtime user sees
    assert props == read_metadata(path) and all(key.startswith("mtpeft.") for key in props)
    onnx.checker.check_model(str(path), full_check=True)  # (the metadata keys are unique)
    assert sidecar_from_metadata(props) == sidecar
    assert props["mtpeft.format"] == "multitask-peft-onnx" and props["mtpeft.version"] == "1"
    assert list(json.loads(props["mtpeft.tasks"])) == ["cls", "cls2", "boxes", "masks", "vote"]
    preprocessing = json.loads(props["mtpeft.preprocessing"])
    assert preprocessing == sidecar["input"]
    assert preprocessing["size"] == [size, size] and preprocessing["mean"] == list(model.data_config.mean)
    assert preprocessing["resize"] == "bilinear" and preprocessing["crop"] is None and preprocessing["color"] == "RGB"
    names = json.loads(props["mtpeft.class_names"])
    assert names.pop("vote") == list(CLASS_NAMES)  # an ensemble's label space is its members'
    assert names == {"cls": list(CLASS_NAMES), "cls2": list(CLASS_NAMES), "boxes": ["hat", "sock"], "masks": None}
    assert json.loads(props["mtpeft.ensembles"]) == {"vote": {"members": ["cls", "cls2"], "mode": "mean_prob"}}
    # the output layout: every graph output, in graph order, with its task, field, dtype and shape
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layout = json.loads(props["mtpeft.outputs"])
    assert [o["name"] for o in layout] == [o.name for o in session.get_outputs()]
    for entry, output in zip(layout, session.get_outputs(), strict=True):
        assert sidecar["tasks"][entry["task"]]["outputs"][entry["field"]] == entry["name"]
        assert entry["shape"] == list(output.shape) and output.type == ORT_TYPES[entry["dtype"]]
        assert entry["kind"] == sidecar["tasks"][entry["task"]]["output"] and entry["holds"]
    boxes = next(o for o in layout if o["name"] == "boxes.boxes")
    assert boxes["shape"] == ["batch", 100, 4] and "x1, y1, x2, y2" in boxes["holds"]


def test_runner_runs_from_the_graph_alone(exported: tuple, tmp_path: Path) -> None:
    """Without its sidecar, `OnnxRunner` reads the graph's metadata_props and gives the same results."""
    model, size, path = exported
    alone = tmp_path / "alone.onnx"
    shutil.copyfile(path, alone)
    runner = mtp.OnnxRunner(alone)
    assert runner.meta == json.loads(sidecar_path(path).read_text()) and runner.tasks == mtp.OnnxRunner(path).tasks
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    got, expected = runner.predict(images), mtp.OnnxRunner(path).predict(images)
    torch.testing.assert_close(got["vote"][1]["logits"], expected["vote"][1]["logits"])
    assert torch.equal(got["masks"][0]["mask"], expected["masks"][0]["mask"])
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save_model(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(FileNotFoundError, match="no sidecar .* and no mtpeft.\\* metadata_props"):
        mtp.OnnxRunner(tmp_path / "bare.onnx")


def _parse(model_dir: Path) -> Any:
    """The model's config.pbtxt parsed into Triton's own `ModelConfig` message (tritonclient ships its protobuf)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_matches_the_graph(exported: tuple, tmp_path: Path) -> None:
    _, _, path = exported
    model_dir = write_triton_repo(path, tmp_path / "repo", model_name="vision", max_batch_size=16)
    assert model_dir == tmp_path / "repo" / "vision"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["vision"]  # no staging folder left behind
    config = _parse(model_dir)
    from tritonclient.grpc import model_config_pb2

    assert config.name == "vision" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, tensors in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in tensors]
        for entry, tensor in zip(declared, tensors, strict=True):
            assert tensor.shape[0] == "batch"  # batch-major: Triton owns the first dimension
            dims = [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]
            assert list(entry.dims) == (dims or [1]), entry.name
            assert entry.HasField("reshape") == (not dims) and list(entry.reshape.shape) == []
            assert model_config_pb2.DataType.Name(entry.data_type) == ORT_TRITON_TYPES[tensor.type], entry.name
    reshaped = [o.name for o in config.output if o.HasField("reshape")]
    assert reshaped == ["boxes.num_detections"]
    # class names where Triton's classification extension reads them: one labels file per classification output
    labels = {o.name: o.label_filename for o in config.output if o.label_filename}
    assert labels == {
        "cls.logits": "cls_labels.txt",
        "cls2.logits": "cls2_labels.txt",
        "vote.logits": "vote_labels.txt",
    }
    for filename in labels.values():
        assert (model_dir / filename).read_text(encoding="utf-8").splitlines() == list(CLASS_NAMES)
    # the graph's metadata, in the graph copy and in the model's parameters (a Triton client reads those)
    props = _metadata(path)
    assert _metadata(model_dir / "1" / "model.onnx") == props
    assert {k: v.string_value for k, v in config.parameters.items()} == props


def test_triton_repository_of_a_fixed_batch_graph(tmp_path: Path) -> None:
    """A graph fixed to batch 1: no batching by Triton, full shapes (the batch dimension included)."""
    model, size = make_model("vit")
    model.add_task("boxes", head=mtp.tasks.Detection(num_classes=2), peft=[mtp.peft.SSF()])
    path = mtp.export_onnx(model, tmp_path / "one.onnx", image_size=size, dynamic_batch=False, optimize=False)
    config = _parse(write_triton_repo(path, tmp_path / "repo", max_batch_size=8))
    assert config.name == "one" and config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[1, 3, size, size]]
    assert {o.name: list(o.dims) for o in config.output} == {
        "boxes.boxes": [1, 100, 4],
        "boxes.scores": [1, 100],
        "boxes.labels": [1, 100],
        "boxes.num_detections": [1],
    }
    assert not any(o.HasField("reshape") or o.label_filename for o in config.output)


def test_triton_repository_rejects_bad_input(exported: tuple, tmp_path: Path) -> None:
    _, _, path = exported
    repo = tmp_path / "repo"
    for name in ("a/b", "..", "", ".hidden"):
        with pytest.raises(ValueError, match=f"model_name must be one folder name.*got {name!r}"):
            write_triton_repo(path, repo, model_name=name)
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 0.*got -1"):
        write_triton_repo(path, repo, max_batch_size=-1)
    with pytest.raises(FileNotFoundError, match="no ONNX graph at"):
        write_triton_repo(tmp_path / "missing.onnx", repo)
    assert not repo.exists()
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match=r"repo/m exists and is not empty: pass force=True \(mtpeft export --force\)"):
        write_triton_repo(path, repo, model_name="m")
    assert (repo / "m" / "stale.txt").is_file()
    write_triton_repo(path, repo, model_name="m", force=True)
    assert sorted(p.name for p in (repo / "m").iterdir()) == [
        "1",
        "cls2_labels.txt",
        "cls_labels.txt",
        "config.pbtxt",
        "vote_labels.txt",
    ]
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    # a graph that is not one of ours (no metadata_props, no sidecar), and an adapter graph
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save_model(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="is not a multitask-peft-onnx v1 export"):
        write_triton_repo(tmp_path / "bare.onnx", repo)
    shutil.copyfile(path, tmp_path / "lora.onnx")
    sidecar = json.loads(sidecar_path(path).read_text())
    write_metadata(
        tmp_path / "lora.onnx", {**sidecar, "form": "adapters", "adapters": {"cls": "lora.cls.onnx_adapter"}}
    )
    with pytest.raises(ValueError, match="adapter graph .* cannot activate"):
        write_triton_repo(tmp_path / "lora.onnx", repo)


def test_triton_repository_of_an_export_without_metadata(exported: tuple, tmp_path: Path) -> None:
    """A graph exported before metadata_props, with its sidecar: the repository's copy gets them."""
    _, _, path = exported
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save_model(bare, str(tmp_path / "old.onnx"))
    shutil.copyfile(sidecar_path(path), tmp_path / "old.json")
    model_dir = write_triton_repo(tmp_path / "old.onnx", tmp_path / "repo")
    assert read_metadata(model_dir / "1" / "model.onnx") == read_metadata(path)


def test_export_command_writes_a_triton_repository(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from multitask_peft.cli import main
    from multitask_peft.run_config import RunConfig, build_model
    from multitask_peft.rundir import RunDirectory

    data = {"source": "imagefolder", "root": str(tmp_path / "data"), "image_size": 32, "augment": "none"}
    head = {"type": "classification", "num_classes": 2, "class_names": ["dark", "bright"]}
    config = RunConfig.from_dict(
        {"backbone": {"name": "test_efficientnet"}, "tasks": {"probe": {"head": head, "data": data}}}
    )
    run = RunDirectory.create(tmp_path / "demo", config)
    build_model(config).save_task("probe", run.tasks_dir / "probe")
    repo = tmp_path / "repo"
    main(["export", str(run.path), "--triton-repo", str(repo), "--no-optimize", "--no-check"])
    assert "triton model:" in capsys.readouterr().out
    model_dir = repo / "demo"  # named after the run directory
    assert (model_dir / "1" / "model.onnx").is_file() and not (model_dir / "1" / "model.json").exists()
    assert (model_dir / "probe_labels.txt").read_text().splitlines() == ["dark", "bright"]
    assert "max_batch_size: 32" in (model_dir / "config.pbtxt").read_text()
    # with an output file too: the graph and its sidecar there, the model named after it
    main(["export", str(run.path), str(tmp_path / "g.onnx"), "--triton-repo", str(repo), "--no-optimize", "--no-check"])
    assert (tmp_path / "g.json").is_file() and (repo / "g" / "config.pbtxt").is_file()
    for argv, message in [
        (["--triton-repo", str(repo)], r"repo/demo exists and is not empty: pass force=True \(mtpeft export --force\)"),
        (["--triton-repo", str(repo), "--triton-model", "a/b"], "model_name must be one folder name"),
        ([], "give the output .onnx file"),
    ]:
        with pytest.raises(SystemExit):
            main(["export", str(run.path), *argv, "--no-optimize", "--no-check"])
        assert re.search(message, capsys.readouterr().err), message
    argv = ["--triton-repo", str(repo), "--force", "--triton-max-batch", "4", "--no-optimize", "--no-check"]
    main(["export", str(run.path), *argv])
    assert "max_batch_size: 4" in (repo / "demo" / "config.pbtxt").read_text()


def test_triton_repository_carries_external_weights(exported: tuple, tmp_path: Path) -> None:
    """A graph whose weights sit in a side file (large exports): the file goes beside the copy, both in
    `write_metadata` and in the repository, and ONNX Runtime loads the copy."""
    _, size, path = exported
    graph = onnx.load(str(path))
    onnx.save_model(graph, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data")
    write_metadata(tmp_path / "big.onnx", json.loads(sidecar_path(path).read_text()))  # weights left where they are
    model_dir = write_triton_repo(tmp_path / "big.onnx", tmp_path / "repo")
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["big.onnx.data", "model.onnx"]
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).numpy()
    logits = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["cls.logits"], {"images": images})[0]
        for p in (model_dir / "1" / "model.onnx", path)
    ]
    torch.testing.assert_close(torch.from_numpy(logits[0]), torch.from_numpy(logits[1]))
