"""Serving: a real HTTP server on 127.0.0.1 (uvicorn in a thread), driven by the client and raw requests."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import multitask_peft as mtp  # noqa: E402
from conftest import make_model, randomize  # noqa: E402
from multitask_peft import serving  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TOKEN = "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn running `engine` in a background thread on a free port."""

    def __init__(self, engine: serving.Engine, admin_token: str | None = TOKEN, **app_options: Any) -> None:
        import uvicorn

        self.engine = engine
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = serving.create_app(engine, admin_token=admin_token, **app_options)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not serving.Client(self.url).ready():
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _build(tmp: Path) -> tuple[mtp.MultiTaskModel, Path]:
    """A reference model with three tasks (one per head) saved under `tmp/tasks`."""
    model, size = make_model("vit")
    assert size == SIZE
    model.add_task("cls", head=mtp.tasks.Classification(num_classes=4, class_names=("a", "b", "c", "d")),
                   peft=[mtp.peft.LoRA(r=4)])  # fmt: skip
    model.add_task("boxes", head=mtp.tasks.Detection(num_classes=3), peft=[mtp.peft.SSF()])
    model.add_task("masks", head=mtp.tasks.Segmentation(num_classes=5), peft=[mtp.peft.Pfeiffer(dim=6)])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k)
    root = tmp / "tasks"
    for name in model.tasks:
        model.save_task(name, root / name)
    return model, root


def _engine(root: Path, max_resident: int | None = None, **config: Any) -> serving.Engine:
    model, _ = make_model("vit")  # same seed: the backbone the tasks were saved for
    store = serving.AdapterStore(model, root, max_resident)
    store.scan()
    store.load_initial()
    backend = serving.TorchBackend(model, store, serving.Preprocess((SIZE, SIZE), MEAN, STD), device="cpu")
    return serving.Engine(backend, serving.EngineConfig(**config))


def _png(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor(png: bytes) -> torch.Tensor:
    """The normalised tensor the server makes of an image already at the model size."""
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[mtp.MultiTaskModel, Path]:
    return _build(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def live(reference: tuple) -> Iterator[LiveServer]:
    _, root = reference
    with LiveServer(_engine(root, max_batch=16, max_wait_ms=20)) as server:
        yield server


def _assert_matches(result: dict[str, Any], expected: dict[str, Any], head: str) -> None:
    if head == "classification":
        torch.testing.assert_close(torch.tensor(result["logits"]), expected["logits"].float(), atol=1e-4, rtol=1e-4)
        assert result["label"] == expected["label"]
    elif head == "detection":
        assert result["labels"] == expected["labels"].tolist()
        torch.testing.assert_close(torch.tensor(result["boxes"]).reshape(-1, 4), expected["boxes"], atol=2e-3, rtol=0)
        torch.testing.assert_close(torch.tensor(result["scores"]), expected["scores"], atol=1e-4, rtol=1e-4)
    else:
        mask = serving.decode_mask_png(result["mask_png"])
        assert (mask == expected["mask"].numpy()).mean() >= 0.999


HEADS = {"cls": "classification", "boxes": "detection", "masks": "segmentation"}


@pytest.mark.parametrize("tasks", [["cls"], ["boxes"], ["masks"], ["masks", "cls", "boxes"]])
def test_round_trip_matches_predict(live: LiveServer, reference: tuple, tasks: list[str]) -> None:
    model, _ = reference
    png = _png(seed=len(tasks))
    with serving.Client(live.url) as client:
        out = client.predict(png, tasks, logits=True)
    assert list(out["results"]) == tasks and out["image_size"] == [SIZE, SIZE]
    assert out["versions"] == {t: 1 for t in tasks}
    expected = model.predict(_tensor(png)[None], tasks)
    for task in tasks:
        _assert_matches(out["results"][task], expected[task][0], HEADS[task])
    if "cls" in tasks:
        assert out["results"]["cls"]["class_name"] == "abcd"[out["results"]["cls"]["label"]]


def test_json_body_and_resized_image(live: LiveServer, reference: tuple) -> None:
    """Base64 JSON upload of an image that is not the model size: boxes and masks come back in its pixels."""
    png = _png(seed=7, size=(96, 128))
    body = {"image": base64.b64encode(png).decode(), "tasks": ["boxes", "masks"], "max_detections": 3,
            "mask_format": "list"}  # fmt: skip
    response = httpx.post(f"{live.url}/v1/predict", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["image_size"] == [96, 128]
    boxes = out["results"]["boxes"]
    assert len(boxes["boxes"]) <= 3 and len(boxes["scores"]) == len(boxes["labels"]) == len(boxes["boxes"])
    for x1, y1, x2, y2 in boxes["boxes"]:
        assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 96
    mask = np.array(out["results"]["masks"]["mask"])
    assert mask.shape == (96, 128) and out["results"]["masks"]["size"] == [96, 128]


def test_concurrent_clients_are_batched(live: LiveServer, reference: tuple) -> None:
    model, _ = reference
    before = live.engine.batches
    pngs = [_png(seed=100 + i) for i in range(12)]
    tasks = [["cls"], ["masks"], ["cls", "boxes"]]
    results: list[Any] = [None] * len(pngs)

    def call(i: int) -> None:
        with serving.Client(live.url) as client:
            results[i] = client.predict(pngs[i], tasks[i % 3], logits=True)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(pngs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = live.engine.batches - before
    assert batches < len(pngs)  # some requests shared a forward pass
    text = serving.Client(live.url).metrics()
    sizes = _histogram(text, "mtp_batch_size")
    assert sizes["sum"] > sizes["count"]  # mean batch size > 1
    for i, out in enumerate(results):
        expected = model.predict(_tensor(pngs[i])[None], tasks[i % 3])
        for task in tasks[i % 3]:
            _assert_matches(out["results"][task], expected[task][0], HEADS[task])


def _histogram(text: str, name: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"{name}_{part} "):
                values[part] = float(line.split()[1])
    return values


def test_tasks_health_and_oip(live: LiveServer) -> None:
    client = httpx.Client(base_url=live.url)
    tasks = client.get("/v1/tasks").json()
    assert {t["name"] for t in tasks["tasks"]} == {"cls", "boxes", "masks"} and tasks["backend"] == "torch"
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "multitask-peft"
    meta = client.get("/v2/models/cls").json()
    assert meta["name"] == "cls" and meta["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE]
    assert client.get("/v2/models/cls/ready").json() == {"name": "cls", "ready": True}
    assert client.get("/v2/models/nope/ready").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{name}", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    metrics = client.get("/metrics").text
    for name in ("mtp_queue_depth", "mtp_batch_size_bucket", "mtp_task_latency_seconds_bucket", "mtp_http_errors"):
        assert name in metrics
