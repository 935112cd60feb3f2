"""Serving: a real HTTP server on 127.0.0.1 (uvicorn in a thread), driven by the client and raw requests."""

from __future__ import annotations

import base64
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

from PIL import Image  # noqa: E402

import multitask_peft as mtp  # noqa: E402
from conftest import make_model, randomize  # noqa: E402
from multitask_peft import serving  # noqa: E402
from multitask_peft.task_io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TOKEN = "s3cret"


def _start(target: Any, args: list[tuple] | None = None, count: int = 1) -> list[threading.Thread]:
    """Started threads running `target`, one per entry of `args` (else `count` without arguments)."""
    threads = [threading.Thread(target=target, args=a) for a in (args if args is not None else [()] * count)]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread], timeout: float | None = None) -> None:
    for t in threads:
        t.join(timeout)


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
    with LiveServer(_engine(root, max_batch=16, max_wait_ms=20), max_body_bytes=2**20) as server:
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


def test_wise_alpha_per_request(live: LiveServer, reference: tuple) -> None:
    """A request's `alpha` runs its tasks at that WiSE coefficient (as `model.predict(..., alpha=)`), batched with
    requests that ask for none; bad values and methods without WiSE form are refused with the reason."""
    model, _ = reference
    png = _png(seed=7)
    expected = model.predict(_tensor(png)[None], ["cls", "masks"], alpha=0.3)
    plain = model.predict(_tensor(png)[None], ["cls"])["cls"][0]
    with serving.Client(live.url) as client:
        out = client.predict(png, ["cls", "masks"], alpha=0.3, logits=True)
        _assert_matches(out["results"]["cls"], expected["cls"][0], "classification")
        _assert_matches(out["results"]["masks"], expected["masks"][0], "segmentation")
        assert (torch.tensor(out["results"]["cls"]["logits"]) - plain["logits"]).abs().max() > 1e-3
        with pytest.raises(serving.ServerError, match="'alpha' must be in") as err:
            client.predict(png, ["cls"], alpha=1.5)
        assert err.value.status == 400
        with pytest.raises(serving.ServerError, match="needs 'alpha'") as err:
            client.predict(png, ["cls"], wise_reference="boxes")
        with pytest.raises(serving.ServerError, match="must leave the backbone frozen") as err:
            client.predict(png, ["cls"], alpha=0.5, wise_reference="boxes")
        assert err.value.status == 422


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

    threads = _start(call, [(i,) for i in range(len(pngs))])
    _join(threads)
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
    assert meta["name"] == "cls" and meta["inputs"][0] == {
        "name": "image",
        "datatype": "UINT8",
        "shape": [-1, -1, -1, 3],
    }
    assert [o["name"] for o in meta["outputs"]] == ["cls.logits", "cls.label", "cls.score"]
    assert meta["outputs"][0]["shape"] == [-1, 4]  # (the task's 4 class names)
    assert client.get("/v2/models/cls/ready").json() == {"name": "cls", "ready": True}
    assert client.get("/v2/models/nope/ready").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{name}", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    metrics = client.get("/metrics").text
    for name in ("mtp_queue_depth", "mtp_batch_size_bucket", "mtp_task_latency_seconds_bucket", "mtp_http_errors"):
        assert name in metrics


def _post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", timeout=30, **kwargs)


def _truncated_png() -> bytes:
    return _png(seed=3)[:200]


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("not an image", 400),
        ("truncated", 400),
        ("bomb", 400),
        ("empty image", 400),
        ("bad json", 400),
        ("bad base64", 400),
        ("json list", 422),
        ("json without image", 422),
        ("json unknown field", 422),
        ("form without image", 422),
        ("tasks not a list", 400),
        ("empty tasks", 400),
        ("unknown task", 404),
        ("bad option", 400),
        ("bad mask format", 400),
        ("text body", 415),
        ("no content type", 415),
        ("too large", 413),
        ("too large streamed", 413),
    ],
)
def test_bad_input(live: LiveServer, case: str, status: int) -> None:
    png = base64.b64encode(_png(seed=1)).decode()
    files = {"image": ("x.png", _png(seed=1), "image/png")}
    requests = {
        "not an image": {"files": {"image": ("x", b"hello world", "image/png")}, "data": {"tasks": "cls"}},
        "truncated": {"files": {"image": ("x", _truncated_png(), "image/png")}, "data": {"tasks": "cls"}},
        "bomb": {"files": {"image": ("x", _bomb_png(), "image/png")}, "data": {"tasks": "cls"}},
        "empty image": {"files": {"image": ("x", b"", "image/png")}, "data": {"tasks": "cls"}},
        "bad json": {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
        "bad base64": {"json": {"image": "%%%", "tasks": ["cls"]}},
        "json list": {"json": [1, 2]},
        "json without image": {"json": {"tasks": ["cls"]}},
        "json unknown field": {"json": {"image": png, "tasks": ["cls"], "colour": 1}},
        "form without image": {"data": {"tasks": "cls"}, "files": {"other": ("x", b"1", "text/plain")}},
        "tasks not a list": {"json": {"image": png, "tasks": 5}},
        "empty tasks": {"json": {"image": png, "tasks": []}},
        "unknown task": {"files": files, "data": {"tasks": "cls,nope"}},
        "bad option": {"files": files, "data": {"tasks": "cls", "score_threshold": "high"}},
        "bad mask format": {"json": {"image": png, "tasks": ["masks"], "mask_format": "gif"}},
        "text body": {"content": b"cls", "headers": {"content-type": "text/plain"}},
        "no content type": {"content": b"cls"},
        "too large": {"content": b"0" * (2**20 + 1), "headers": {"content-type": "application/json"}},
        "too large streamed": {
            "content": iter([b"0" * 2**19] * 3),  # chunked: no Content-Length
            "headers": {"content-type": "application/json"},
        },
    }
    before = _errors(live.url, status)
    response = _post(live.url, **requests[case])
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status and response.json()["error"]["message"]
    assert _errors(live.url, status) == before + 1


def _errors(url: str, status: int) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'mtp_http_errors_total{{code="{status}"}}'):
            return float(line.split()[1])
    return 0.0


def test_admin_auth_and_paths(live: LiveServer, reference: tuple) -> None:
    _, root = reference
    url = f"{live.url}/v1/tasks"
    body = {"path": "cls", "name": "cls2"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.delete(f"{url}/cls").status_code == 401
    admin = {"Authorization": f"Bearer {TOKEN}"}
    outside = root.parent / "outside"
    if not outside.exists():
        shutil.copytree(root / "cls", outside)
        (root / "link").symlink_to(outside, target_is_directory=True)
    for path in ("../outside", str(outside), "/etc", str(root.parent), "link", "cls/../../outside", ""):
        response = httpx.post(url, json={"path": path}, headers=admin)
        assert response.status_code == 400, (path, response.text)
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / CONFIG_NAME).write_text("{not json")
    (root / "junk" / WEIGHTS_NAME).write_bytes(b"x")
    assert httpx.post(url, json={"path": "junk"}, headers=admin).status_code == 400
    assert httpx.post(url, json={"path": "cls", "name": "Bad Name"}, headers=admin).status_code == 400
    assert httpx.delete(f"{url}/nope", headers=admin).status_code == 404
    assert httpx.post(url, content=b"x", headers={**admin, "content-type": "text/plain"}).status_code == 415
    shutil.rmtree(root / "junk")
    (root / "link").unlink()
    with serving.Client(live.url, admin_token=TOKEN) as client:  # load a copy under another name, then drop it
        info = client.load_task("cls", name="cls2")
        assert info["name"] == "cls2" and info["resident"] and len(info["digest"]) == 64
        out = client.predict(_png(seed=5), ["cls", "cls2"], logits=True)["results"]
        assert out["cls"]["logits"] == pytest.approx(out["cls2"]["logits"], abs=1e-5)
        client.unload_task("cls2")
        assert "cls2" not in {t["name"] for t in client.tasks()}
        with pytest.raises(serving.ServerError) as err:
            client.predict(_png(seed=5), ["cls2"])
        assert err.value.status == 404


def test_admin_disabled_without_token(reference: tuple) -> None:
    _, root = reference
    with LiveServer(_engine(root), admin_token=None) as server:
        response = httpx.post(f"{server.url}/v1/tasks", json={"path": "cls"}, headers={"Authorization": "Bearer x"})
        assert response.status_code == 403 and "disabled" in response.json()["error"]["message"]


def test_hot_load_and_unload_under_load(reference: tuple, tmp_path: Path) -> None:
    """A load generator keeps predicting while tasks are replaced, added and removed: no failed or wrong answers."""
    model, root = reference
    shutil.copytree(root, tmp_path / "tasks")
    root = tmp_path / "tasks"
    other, _ = make_model("vit")  # a second version of `cls`: other weights, same shape
    other.add_task("cls", head=mtp.tasks.Classification(num_classes=4), peft=[mtp.peft.LoRA(r=4)])
    randomize(other.task("cls"), seed=42)
    other.save_task("cls", root / "cls_v2")
    png = _png(seed=9)
    image = _tensor(png)[None]
    expected = {
        1: model.predict(image, "cls")["cls"][0]["logits"],
        2: other.predict(image, "cls")["cls"][0]["logits"],
    }
    masks = model.predict(image, "masks")["masks"][0]
    failures: list[str] = []
    seen: set[int] = set()
    stop = threading.Event()

    def generate() -> None:
        with serving.Client(server.url) as client:
            while not stop.is_set():
                try:
                    out = client.predict(png, ["cls", "masks"], logits=True)
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))
                    continue
                version = out["versions"]["cls"]
                seen.add(version)
                got = torch.tensor(out["results"]["cls"]["logits"])
                if not torch.allclose(got, expected[version].float(), atol=1e-4):
                    failures.append(f"cls v{version} logits {got} != {expected[version]}")
                if (
                    serving.decode_mask_png(out["results"]["masks"]["mask_png"]) != masks["mask"].numpy()
                ).mean() > 1e-3:
                    failures.append("masks differ")

    with LiveServer(_engine(root, max_batch=8, max_wait_ms=2)) as server:
        threads = _start(generate, count=3)
        with serving.Client(server.url, admin_token=TOKEN) as admin:
            time.sleep(0.3)
            assert admin.load_task("cls_v2", name="cls")["version"] == 2
            time.sleep(0.3)
            admin.load_task("boxes", name="extra")
            time.sleep(0.2)
            admin.unload_task("extra")
            admin.unload_task("boxes")
            time.sleep(0.3)
        stop.set()
        _join(threads)
        assert not failures, failures[:5]
        assert seen == {1, 2}
        assert {t["name"] for t in serving.Client(server.url).tasks()} == {"cls", "masks", "cls_v2"}


def test_lru_eviction_and_reload(reference: tuple) -> None:
    model, root = reference
    engine = _engine(root, max_resident=2, max_wait_ms=1)
    with LiveServer(engine) as server, serving.Client(server.url) as client:
        png = _png(seed=11)
        expected = model.predict(_tensor(png)[None], ["cls", "boxes", "masks"])
        for tasks in (["cls"], ["boxes"], ["masks"], ["cls"], ["masks", "boxes"], ["cls", "masks"]):
            out = client.predict(png, tasks, logits=True)["results"]
            for task in tasks:
                _assert_matches(out[task], expected[task][0], HEADS[task])
            resident = {t["name"] for t in client.tasks() if t["resident"]}
            assert set(tasks) <= resident and len(resident) <= 2
        with pytest.raises(serving.ServerError) as err:
            client.predict(png, ["cls", "boxes", "masks"])  # more tasks than may sit in the model
        assert err.value.status == 400
        metrics = client.metrics()
        assert _metric(metrics, "mtp_task_evictions_total") >= 3
        assert _metric(metrics, "mtp_tasks_resident") == 2


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


class _SlowBackend:
    """Any backend, but its batches take `delay` seconds more (to fill the queue or time requests out) and a batch
    with a task named `boom...` fails; everything else is the backend's own."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, images: torch.Tensor, tasks: list[list[str]]) -> Any:
        time.sleep(self.delay)
        if any("boom" in t for names in tasks for t in names):
            raise RuntimeError("boom")
        return self.inner.run(images, tasks)


def test_overload_timeout_and_shutdown(reference: tuple) -> None:
    _, root = reference
    engine = _engine(root, max_batch=1, max_queue=2, max_wait_ms=0)
    engine.backend = _SlowBackend(engine.backend, 0.3)
    with LiveServer(engine) as server:
        png = _png(seed=2)
        statuses: list[int] = []
        headers: list[httpx.Headers] = []

        def call() -> None:
            files = {"image": ("x.png", png, "image/png")}
            response = _post(server.url, files=files, data={"tasks": "cls"})
            statuses.append(response.status_code)
            headers.append(response.headers)

        threads = _start(call, count=8)
        _join(threads)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
        assert all(int(h["retry-after"]) >= 1 for h, s in zip(headers, statuses, strict=True) if s == 429)
        response = _post(
            server.url, files={"image": ("x", png, "image/png")}, data={"tasks": "cls", "timeout_s": "0.1"}
        )
        assert response.status_code == 504
        engine.closing = True
        try:
            response = _post(server.url, files={"image": ("x", png, "image/png")}, data={"tasks": "cls"})
            assert response.status_code == 503 and "retry-after" in response.headers
            assert httpx.get(f"{server.url}/health/ready").status_code == 503
        finally:
            engine.closing = False


def test_failing_batch_fails_only_its_request(reference: tuple, tmp_path: Path) -> None:
    model, root = reference
    shutil.copytree(root / "cls", tmp_path / "boom")
    shutil.copytree(root / "cls", tmp_path / "cls")
    engine = _engine(tmp_path, max_batch=8, max_wait_ms=100)
    engine.backend = _SlowBackend(engine.backend, 0.0)
    with LiveServer(engine) as server:
        statuses: dict[str, int] = {}

        def call(task: str) -> None:
            files = {"image": ("x.png", _png(seed=3), "image/png")}
            statuses[task] = _post(server.url, files=files, data={"tasks": task}).status_code

        threads = _start(call, [(t,) for t in ("cls", "boom")])
        _join(threads)
        assert statuses == {"cls": 200, "boom": 500}
        assert serving.Client(server.url).predict(_png(seed=4), "cls")["results"]["cls"]["label"] in range(4)


_SERVER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_serving import _SlowBackend, _engine
from multitask_peft import serving
from multitask_peft.serving.server import _Server
from pathlib import Path
engine = _engine(Path(sys.argv[2]), max_batch=1, max_wait_ms=0, drain_timeout_s=20)
engine.backend = _SlowBackend(engine.backend, 0.4)
app = serving.create_app(engine)
_Server(app, engine, "127.0.0.1", int(sys.argv[3]), drain_s=20, log_level="warning").run()
"""


def test_sigterm_drains_requests_in_flight(reference: tuple) -> None:
    """SIGTERM while requests are queued: each of them is answered, then the process exits."""
    import signal
    import subprocess
    import sys

    _, root = reference
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(Path(__file__).parent), str(root), str(port)])
    try:
        deadline = time.monotonic() + 60
        while not serving.Client(url).ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        statuses: list[int] = []

        def call() -> None:
            files = {"image": ("x.png", _png(seed=6), "image/png")}
            statuses.append(_post(url, files=files, data={"tasks": "cls"}).status_code)

        threads = _start(call, count=4)
        time.sleep(0.3)  # all four accepted; about one has run
        proc.send_signal(signal.SIGTERM)
        _join(threads, timeout=30)
        assert statuses == [200] * 4
        # uvicorn re-raises the signal once drained, so supervisors see how the process ended
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_replace_with_new_classes_then_unload_under_load(reference: tuple, tmp_path: Path) -> None:
    """A replacement with other class names: every answer is formatted by the version that computed it (names and
    version agree), and unloading the replaced task afterwards drains and succeeds."""
    _, root = reference
    shutil.copytree(root, tmp_path / "tasks")
    root = tmp_path / "tasks"
    other, _ = make_model("vit")
    other.add_task("cls", head=mtp.tasks.Classification(num_classes=4, class_names=("w", "x", "y", "z")),
                   peft=[mtp.peft.LoRA(r=4)])  # fmt: skip
    randomize(other.task("cls"), seed=7)
    other.save_task("cls", root / "cls_v2")
    names = {1: "abcd", 2: "wxyz"}
    failures: list[str] = []
    stop = threading.Event()

    def generate() -> None:
        with serving.Client(server.url) as client:
            while not stop.is_set():
                try:
                    out = client.predict(_png(seed=1), ["cls"])
                except serving.ServerError as e:
                    if e.status != 404:  # 404 once the task is gone
                        failures.append(repr(e))
                    continue
                result, version = out["results"]["cls"], out["versions"]["cls"]
                if result["class_name"] != names[version][result["label"]]:
                    failures.append(f"v{version} answered with class name {result['class_name']}")

    with LiveServer(_engine(root, max_batch=4, max_wait_ms=2)) as server:
        threads = _start(generate, count=3)
        with serving.Client(server.url, admin_token=TOKEN) as admin:
            time.sleep(0.2)
            admin.load_task("cls_v2", name="cls")
            time.sleep(0.2)
            admin.unload_task("cls")
            time.sleep(0.1)
        stop.set()
        _join(threads)
        assert not failures, failures[:5]
        assert "cls" not in {t["name"] for t in serving.Client(server.url).tasks()}
        assert server.engine.backend.store.pending("cls") == 0


def test_bad_task_folder_is_skipped_at_start(
    reference: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken folders and HF PEFT adapters (no head: `mtpeft import-peft` first) are skipped with a warning; folders
    with the old file names (adapter_config.json + adapter_model.safetensors) are served."""
    model, root = reference
    shutil.copytree(root / "cls", tmp_path / "good")
    shutil.copytree(root / "cls", tmp_path / "legacy")
    (tmp_path / "legacy" / CONFIG_NAME).rename(tmp_path / "legacy" / "adapter_config.json")
    (tmp_path / "legacy" / WEIGHTS_NAME).rename(tmp_path / "legacy" / "adapter_model.safetensors")
    model.save_task("cls", tmp_path / "peft", format="peft")
    shutil.copytree(root / "cls", tmp_path / "broken")
    (tmp_path / "broken" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    shutil.copytree(root / "cls", tmp_path / "badhead")
    config = json.loads((tmp_path / "badhead" / CONFIG_NAME).read_text())
    config["head"] = 5
    (tmp_path / "badhead" / CONFIG_NAME).write_text(json.dumps(config))
    engine = _engine(tmp_path)
    assert list(engine.backend.store.entries) == ["good", "legacy"]
    assert "an HF PEFT adapter" in caplog.text and "mtpeft import-peft" in caplog.text


def test_server_errors_are_counted(reference: tuple, tmp_path: Path) -> None:
    """A request that fails inside the server is a 500 and shows in mtp_http_errors."""
    _, root = reference
    shutil.copytree(root / "cls", tmp_path / "boom")
    engine = _engine(tmp_path)
    engine.backend = _SlowBackend(engine.backend, 0.0)
    with LiveServer(engine) as server:
        response = _post(server.url, files={"image": ("x", _png(seed=1), "image/png")}, data={"tasks": "boom"})
        assert response.status_code == 500 and "forward pass failed" in response.json()["error"]["message"]
        assert _errors(server.url, 500) == 1


def _check_backend_protocol(backend: Any) -> None:
    """`backend` has every member of `serving.Backend` (the engine and the app use nothing else)."""
    members = {n for n in vars(serving.Backend) if not n.startswith("_")} | set(serving.Backend.__annotations__)
    assert {"run", "prepare", "acquire", "load", "unload", "bind", "preprocess"} <= members
    missing = [n for n in sorted(members) if not hasattr(backend, n)]
    assert not missing, f"{type(backend).__name__} lacks {missing}"


def test_torch_backend_implements_the_protocol(reference: tuple) -> None:
    _, root = reference
    _check_backend_protocol(_engine(root).backend)


def test_onnx_backend_batches_mixed_requests(reference: tuple, tmp_path: Path) -> None:
    """The ONNX backend: concurrent requests for different tasks share forward passes; each gets its own tasks'
    results, equal to model.predict; its tasks are fixed (admin loads and unloads answer 409, tasks unchanged)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, _ = reference
    path = mtp.export_onnx(model, tmp_path / "model.onnx", image_size=SIZE, mean=MEAN, std=STD, optimize=False)
    engine = serving.Engine(serving.OnnxBackend(path), serving.EngineConfig(max_batch=8, max_wait_ms=50))
    _check_backend_protocol(engine.backend)
    with LiveServer(engine) as server:
        pngs = [_png(seed=200 + i) for i in range(6)]
        wanted = [["cls"], ["masks", "boxes"], ["boxes"], ["cls", "masks"], ["masks"], ["cls", "boxes", "masks"]]
        results: list[Any] = [None] * len(pngs)

        def call(i: int) -> None:
            with serving.Client(server.url) as client:
                results[i] = client.predict(pngs[i], wanted[i], logits=True)

        threads = _start(call, [(i,) for i in range(len(pngs))])
        _join(threads)
        assert engine.batches < len(pngs)
        for i, out in enumerate(results):
            assert list(out["results"]) == wanted[i]
            expected = model.predict(_tensor(pngs[i])[None], wanted[i])
            for task in wanted[i]:
                _assert_matches(out["results"][task], expected[task][0], HEADS[task])
        admin = {"Authorization": f"Bearer {TOKEN}"}
        for response in (
            httpx.post(f"{server.url}/v1/tasks", json={"path": "cls", "name": "cls2"}, headers=admin),
            httpx.delete(f"{server.url}/v1/tasks/cls", headers=admin),
            httpx.delete(f"{server.url}/v1/tasks/nope", headers=admin),
            httpx.post(f"{server.url}/v1/tasks", content=b"{not json", headers=admin),  # 409 before the body
            httpx.post(f"{server.url}/v1/tasks", data={"path": "cls"}, headers=admin),
        ):
            assert response.status_code == 409 and "re-export" in response.json()["error"]["message"], response.text
        assert httpx.delete(f"{server.url}/v1/tasks/cls").status_code == 401  # the admin token comes first
        listing = httpx.get(f"{server.url}/v1/tasks").json()
        assert listing["backend"] == "onnx" and [t["name"] for t in listing["tasks"]] == ["cls", "boxes", "masks"]
        with serving.Client(server.url) as client:
            assert list(client.predict(pngs[0], ["cls"])["results"]) == ["cls"]
            with pytest.raises(serving.ServerError) as err:
                client.predict(pngs[0], ["cls", "nope"])
            assert err.value.status == 404
