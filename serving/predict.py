"""`mtpeft predict`: a run's tasks on image files, results as JSON lines and pictures.

Offline serving: the same image decoder as the server (`Preprocess.open`: EXIF orientation applied, RGB, the
same size and decompression-bomb checks), the same model call (`MultiTaskModel.predict`, or the exported graph
through `OnnxRunner`) and the same JSON forms of the output kinds, so a file gives the answer `POST /v1/predict`
would give for it. Results are in each image's own pixels (boxes scaled, masks resized nearest).

```
OUT/results.jsonl           one line per image: {"image", "width", "height", "picture", "tasks": {task: result}}
OUT/<stem>.png              the image with every task's result drawn on it (`multitask_peft.visualize`)
OUT/masks/<stem>.<task>.png a segmentation task's class ids (8-bit, 16-bit past 255 classes), at the image's size
```
"""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from multitask_peft.outputs import OUTPUT_KINDS, JsonContext, ResultOptions
from multitask_peft.rundir import ONNX_FILE, RunDirectory
from multitask_peft.visualize import draw_results

from .errors import BadRequest
from .images import Preprocess

#: File name endings of the images found in folders (any file named explicitly is tried, whatever its ending).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESULTS_FILE = "results.jsonl"
MASKS_DIR = "masks"


@dataclass(frozen=True)
class TaskInfo:
    """What formatting a task's results needs: its output kind, class names and the head's own score threshold."""

    kind: str
    class_names: tuple[str, ...] | None
    score_threshold: float | None


@dataclass
class Predictor:
    """A model ready for files: how it wants its input, its tasks, and `run(images, tasks) -> {task: [result]}`
    (per image result dicts as `MultiTaskModel.predict` returns them, on the CPU)."""

    source: str
    preprocess: Preprocess
    tasks: dict[str, TaskInfo]
    run: Callable[[torch.Tensor, list[str]], dict[str, list[dict[str, Any]]]]


def _info(kind: str, head_config: Mapping[str, Any]) -> TaskInfo:
    names = head_config.get("class_names")
    threshold = head_config.get("score_thresh")
    return TaskInfo(kind, tuple(names) if names else None, float(threshold) if threshold is not None else None)


def _cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def torch_predictor(run_dir: str | Path, device: str | None = None) -> Predictor:
    """A run directory's model with every trained task and ensemble (`RunDirectory.load_model`), on `device`
    (default: CUDA if available)."""
    run = RunDirectory(run_dir)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = run.load_model().to(target).eval()
    spec = run.input_spec(model)
    names = [*model.tasks, *model.ensembles]
    tasks = {n: _info(model.head_config(n).output_kind, model.head_config(n).to_dict()) for n in names}

    def run_model(images: torch.Tensor, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        with torch.inference_mode():
            out = model.predict(images.to(target), names)
        return {t: [{k: _cpu(v) for k, v in r.items()} for r in results] for t, results in out.items()}

    return Predictor(f"{run.path} (torch, {target})", Preprocess(spec.size, spec.mean, spec.std), tasks, run_model)


def onnx_predictor(path: str | Path, device: str | None = None) -> Predictor:
    """An exported graph (`.onnx` with its sidecar) on ONNX Runtime; `device` "cpu" keeps it on the CPU provider
    (default: CUDA when onnxruntime-gpu offers it)."""
    try:
        from multitask_peft.onnx_runner import OnnxRunner, sidecar_kind
    except ImportError as e:
        raise ValueError(f"ONNX graphs need the `onnx` extra: pip install 'multitask-peft[onnx]' ({e})") from e
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    runner = OnnxRunner(path, providers=providers)
    inp = runner.meta["input"]
    tasks = {n: _info(sidecar_kind(spec), spec["head_config"]) for n, spec in runner.meta["tasks"].items()}
    preprocess = Preprocess(tuple(inp["size"]), tuple(inp["mean"]), tuple(inp["std"]))
    providers_used = runner.session.get_providers()[0].removesuffix("ExecutionProvider")
    return Predictor(f"{runner.path} (ONNX Runtime, {providers_used})", preprocess, tasks, runner.predict)


def load_predictor(source: str | Path, onnx: bool = False, device: str | None = None) -> Predictor:
    """`SOURCE` of `mtpeft predict`: a run directory (its tasks in PyTorch, or its `model.onnx` with `onnx`) or an
    exported `.onnx` graph.

    Raises:
        ValueError: `source` is neither, or the graph asked for is missing.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ValueError(f"{path} is neither a run directory nor an exported .onnx graph")
        return onnx_predictor(path, device)
    if not path.is_dir():
        raise ValueError(f"no run directory or .onnx graph at {path}")
    if onnx:
        graph = path / ONNX_FILE
        if not graph.is_file():
            raise ValueError(
                f"no {ONNX_FILE} in {path}; export one with `mtpeft export {path} {graph}` or leave out --onnx"
            )
        return onnx_predictor(graph, device)
    return torch_predictor(path, device)


def find_images(inputs: Iterable[str | Path], exclude: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files of `inputs`: files as given, folders searched recursively for `IMAGE_EXTENSIONS` (any case),
    sorted; files under `exclude` (the output folder) are left out, so a second run does not read its own pictures.

    Returns:
        (images without duplicates, in order; [(input, why it was skipped)] for inputs that do not exist).
    """
    images: list[Path] = []
    problems: list[tuple[str, str]] = []
    skip = exclude.resolve() if exclude is not None else None
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not (skip is not None and p.resolve().is_relative_to(skip))
            ]
            images += found
        elif path.is_file():
            images.append(path)
        else:
            problems.append((str(item), "no such file or folder"))
    return list(dict.fromkeys(images)), problems


def select_tasks(predictor: Predictor, tasks: str | Sequence[str] | None) -> list[str]:
    """The tasks to run (`--tasks a,b`; default: every task of the source), checked against the source."""
    if tasks is None:
        return list(predictor.tasks)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t for t in names if t))
    unknown = [t for t in names if t not in predictor.tasks]
    if unknown or not names:
        raise ValueError(f"--tasks {unknown or names}: not tasks of {predictor.source}; it has {list(predictor.tasks)}")
    return names


def _top_k(result: Mapping[str, Any], class_names: Sequence[str] | None, k: int = 5) -> list[dict[str, Any]]:
    probabilities = torch.as_tensor(result["logits"]).float().softmax(-1)
    scores, labels = probabilities.topk(min(k, len(probabilities)))
    top = []
    for label, score in zip(labels.tolist(), scores.tolist(), strict=True):
        entry: dict[str, Any] = {"label": int(label), "score": float(score)}
        if class_names:
            entry["class_name"] = class_names[label]
        top.append(entry)
    return top


@dataclass
class Formatted:
    """One task's result for one image: its JSON, what is drawn (the result in the image's pixels), and the files
    to write (path relative to the output folder -> bytes)."""

    json: dict[str, Any]
    drawn: dict[str, Any]
    files: dict[str, bytes]


def format_result(
    task: TaskInfo,
    name: str,
    result: Mapping[str, Any],
    input_size: tuple[int, int],
    original: tuple[int, int],
    stem: str,
    score_threshold: float | None = None,
) -> Formatted:
    """A task's result as `mtpeft predict` writes it, in the pixels of the original image: the output kind's
    JSON (what the server answers), with a top-5 for classification, and for segmentation the mask as a PNG file
    (`masks/<stem>.<task>.png`) plus the classes present with their pixel counts."""
    options = ResultOptions(score_threshold=score_threshold or 0.0)
    context = JsonContext(input_size, original, options, task.class_names)
    out = OUTPUT_KINDS.get(task.kind).to_json(result, context)
    if task.kind == "classification":
        out["top5"] = _top_k(result, task.class_names)
        return Formatted(out, dict(result), {})
    if task.kind == "detection":
        drawn = {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"]}
        return Formatted(out, drawn, {})
    if task.kind == "segmentation" and "mask_png" in out:
        png = base64.b64decode(out.pop("mask_png"))
        mask = np.asarray(Image.open(io.BytesIO(png))).astype(np.int64)  # (H, W) at the original size
        ids, counts = np.unique(mask, return_counts=True)
        out.pop("class_names", None)
        out["classes"] = [
            {"id": int(i), **({"name": task.class_names[i]} if task.class_names else {}), "pixels": int(c)}
            for i, c in zip(ids, counts, strict=True)
        ]
        out["mask_png"] = f"{MASKS_DIR}/{stem}.{name}.png"
        return Formatted(out, {"mask": mask}, {out["mask_png"]: png})
    return Formatted(out, dict(result), {})


@dataclass
class Summary:
    """Images processed and images skipped (unreadable, undecodable) by `predict_files`."""

    done: int = 0
    skipped: int = 0


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem.lower() in used:  # case-insensitive file systems too
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem.lower())
    return stem


def predict_files(
    predictor: Predictor,
    images: Sequence[Path],
    out: str | Path,
    tasks: Sequence[str],
    score_threshold: float | None = None,
    batch_size: int = 8,
    draw: bool = True,
    report: Callable[[str], None] | None = None,
) -> Summary:
    """Run `tasks` on `images` in batches of `batch_size`; write `out/results.jsonl`, the pictures and the mask
    PNGs. Images that cannot be read or decoded are reported (`report`, default: stderr) and skipped.

    A tqdm bar shows progress for more than one image.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    input_size = tuple(predictor.preprocess.size)
    summary, used = Summary(), set()
    bar = tqdm(total=len(images), unit="image", disable=len(images) <= 1, file=sys.stderr, dynamic_ncols=True)

    def skip(path: Path, reason: str) -> None:
        summary.skipped += 1
        message = f"mtpeft predict: skipped {path}: {reason}"
        if report is not None:
            report(message)
        else:
            tqdm.write(message, file=sys.stderr)  # above the bar, which stays intact

    with (out / RESULTS_FILE).open("w") as lines, bar:
        for start in range(0, len(images), batch_size):
            batch = []  # (path, upright RGB image, model input)
            for path in images[start : start + batch_size]:
                try:
                    image = predictor.preprocess.open(path.read_bytes())
                except (OSError, BadRequest) as e:
                    skip(path, str(e) if isinstance(e, BadRequest) else f"cannot read it ({e.strerror or e})")
                    bar.update()
                    continue
                batch.append((path, image, predictor.preprocess.tensor(image)))
            if not batch:
                continue
            results = predictor.run(torch.stack([x for _, _, x in batch]), list(tasks))
            for i, (path, image, _) in enumerate(batch):
                stem = _unique_stem(path, used)
                original = (image.height, image.width)
                formatted = {
                    t: format_result(predictor.tasks[t], t, results[t][i], input_size, original, stem, score_threshold)
                    for t in tasks
                }
                for f in formatted.values():
                    for relative, data in f.files.items():
                        (out / relative).parent.mkdir(parents=True, exist_ok=True)
                        (out / relative).write_bytes(data)
                record = {"image": str(path), "width": image.width, "height": image.height}
                if draw:
                    pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
                    items = [
                        (t, predictor.tasks[t].kind, f.drawn, predictor.tasks[t].class_names)
                        for t, f in formatted.items()
                    ]
                    picture = draw_results(pixels, items)
                    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out / f"{stem}.png")
                    record["picture"] = f"{stem}.png"
                record["tasks"] = {t: f.json for t, f in formatted.items()}
                lines.write(json.dumps(record) + "\n")
                lines.flush()
                summary.done += 1
                bar.update()
    return summary
