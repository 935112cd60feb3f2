"""Open Inference Protocol v2 over REST and gRPC, driven by NVIDIA's own clients (`tritonclient`)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpclient = pytest.importorskip("tritonclient.http")
from PIL import Image  # noqa: E402
from test_serving import HEADS, LiveServer, _build, _engine, _free_port, _png  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from multitask_peft import serving  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _build(tmp_path_factory.mktemp("oip"))


@pytest.fixture(scope="module")
def live(reference: tuple) -> Iterator[LiveServer]:
    _, root = reference
    with LiveServer(_engine(root, max_batch=16, max_wait_ms=5), max_body_bytes=2**22) as server:
        yield server


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _v1(live: LiveServer, png: bytes, tasks: list[str]) -> dict:
    with serving.Client(live.url) as client:
        return client.predict(png, tasks, logits=True, mask_format="list")["results"]


def _check(result: httpclient.InferResult, v1: dict, task: str, i: int = 0) -> None:
    head = HEADS[task]
    if head == "classification":
        np.testing.assert_allclose(result.as_numpy(f"{task}.logits")[i], v1["logits"], atol=1e-5, rtol=1e-5)
        assert result.as_numpy(f"{task}.label")[i] == v1["label"]
        assert result.as_numpy(f"{task}.score")[i] == pytest.approx(v1["score"], abs=1e-6)
    elif head == "detection":
        n = int(result.as_numpy(f"{task}.num_detections")[i])
        assert n == len(v1["scores"])
        np.testing.assert_allclose(result.as_numpy(f"{task}.boxes")[i, :n], np.reshape(v1["boxes"], (-1, 4)), atol=2e-3)
        assert result.as_numpy(f"{task}.labels")[i, :n].tolist() == v1["labels"]
        assert (result.as_numpy(f"{task}.labels")[i, n:] == -1).all()
    else:
        np.testing.assert_array_equal(result.as_numpy(f"{task}.mask")[i], np.asarray(v1["mask"]))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_every_task_kind_matches_v1(live: LiveServer, binary: bool) -> None:
    client = httpclient.InferenceServerClient(live.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cls")
    assert client.get_server_metadata()["name"] == "multitask-peft"
    png = _png(seed=5, size=(48, 80))  # not the model size: results come in the sent image's pixels
    for task in HEADS:
        meta = client.get_model_metadata(task)
        names = [o["name"] for o in meta["outputs"]]
        image = httpclient.InferInput("image", [1, 48, 80, 3], "UINT8")
        image.set_data_from_numpy(_pixels(png)[None], binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
        result = client.infer(task, [image], outputs=outputs, request_id=f"r-{task}")
        assert result.get_response()["id"] == f"r-{task}"
        for o in meta["outputs"]:  # the metadata says what comes back
            got = result.as_numpy(o["name"])
            assert result.get_output(o["name"])["datatype"] == o["datatype"]
            assert len(got.shape) == len(o["shape"]) and all(w in (-1, g) for w, g in zip(o["shape"], got.shape))
        _check(result, _v1(live, png, [task])[task], task)


def test_all_model_several_tasks_bytes_batch_and_parameters(live: LiveServer) -> None:
    client = httpclient.InferenceServerClient(live.url.removeprefix("http://"))
    meta = client.get_model_metadata("ALL")
    assert {o["name"].split(".")[0] for o in meta["outputs"]} == set(HEADS)
    pngs = [_png(seed=s) for s in (1, 2)]
    image = httpclient.InferInput("image_bytes", [2], "BYTES")
    image.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    batches = live.engine.batches
    result = client.infer("ALL", [image], parameters={"tasks": "cls,boxes", "score_threshold": 0.0})
    assert live.engine.batches == batches + 1  # the request's images join one batch of the engine
    assert {o["name"].split(".")[0] for o in result.get_response()["outputs"]} == {"cls", "boxes"}
    for i, png in enumerate(pngs):
        v1 = _v1(live, png, ["cls", "boxes"])
        _check(result, v1["cls"], "cls", i)
        _check(result, v1["boxes"], "boxes", i)
    # max_detections is honoured; the requested outputs pick the tasks of ALL
    few = client.infer(
        "ALL",
        [image],
        outputs=[httpclient.InferRequestedOutput("boxes.num_detections")],
        parameters={"max_detections": 1},
    )
    assert few.as_numpy("boxes.num_detections").max() <= 1 and few.as_numpy("cls.logits") is None
    # WiSE alpha per request, as in /v1/predict
    half = client.infer("cls", [image], parameters={"alpha": 0.5})
    with serving.Client(live.url) as v1_client:
        expected = v1_client.predict(pngs[0], ["cls"], logits=True, alpha=0.5)["results"]["cls"]["logits"]
    np.testing.assert_allclose(half.as_numpy("cls.logits")[0], expected, atol=1e-5, rtol=1e-5)
    plain = client.infer("cls", [image]).as_numpy("cls.logits")[0]
    assert np.abs(plain - expected).max() > 1e-4
    # compressed request body
    result = client.infer("cls", [image], request_compression_algorithm="gzip")
    assert result.as_numpy("cls.logits").shape == (2, 4)


def test_errors_are_readable_by_the_client(live: LiveServer) -> None:
    client = httpclient.InferenceServerClient(live.url.removeprefix("http://"))
    image = httpclient.InferInput("image", [4, 4, 3], "UINT8")
    image.set_data_from_numpy(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
        client.infer("nope", [image])
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match=r"unknown parameter\(s\) \['score_treshold'\]"):
        client.infer("cls", [image], parameters={"score_treshold": 0.5})
    with pytest.raises(InferenceServerException, match="version 1, not '7'"):
        client.infer("cls", [image], model_version="7")
    wrong = httpclient.InferInput("image", [4, 4], "UINT8")
    wrong.set_data_from_numpy(np.zeros((4, 4), np.uint8))
    with pytest.raises(InferenceServerException, match=r"\[N, H, W, 3\]"):
        client.infer("cls", [wrong])
    garbage = httpclient.InferInput("image_bytes", [1], "BYTES")
    garbage.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="cannot decode the image"):
        client.infer("cls", [garbage])
    import httpx

    raw = httpx.post(f"{live.url}/v2/models/cls/infer", content=b"{not json")
    assert raw.status_code == 400 and isinstance(raw.json()["error"], str)
    missing = httpx.get(f"{live.url}/v2/models/nope")
    assert (
        missing.status_code == 404 and set(missing.json()) == {"error"} and "unknown model" in missing.json()["error"]
    )


def test_tritonclient_grpc_matches_v1(reference: tuple) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, root = reference
    port = _free_port()
    with LiveServer(_engine(root, max_batch=8), grpc_port=port) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("masks")
        assert client.get_server_metadata().name == "multitask-peft"
        meta = client.get_model_metadata("ALL")
        assert {o.name for o in meta.outputs} >= {"cls.logits", "boxes.boxes", "masks.mask"}
        png = _png(seed=9, size=(40, 56))
        image = grpcclient.InferInput("image", [1, 40, 56, 3], "UINT8")
        image.set_data_from_numpy(_pixels(png)[None])
        result = client.infer("ALL", [image], request_id="g1")
        assert result.get_response().id == "g1"
        v1 = _v1(server, png, list(HEADS))
        for task in HEADS:
            _check(result, v1[task], task)
        with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
            client.infer("nope", [image])
        assert "NOT_FOUND" in str(e.value.status())
        image_bytes = grpcclient.InferInput("image_bytes", [1], "BYTES")
        image_bytes.set_data_from_numpy(np.array([b"junk"], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="cannot decode the image") as e:
            client.infer("cls", [image_bytes])
        assert "INVALID_ARGUMENT" in str(e.value.status())
        client.close()


def test_metadata_gives_the_class_count_without_class_names() -> None:
    from multitask_peft.serving import oip

    info = {"name": "t", "head": "classification", "class_names": None, "num_classes": 7}
    assert oip.task_outputs(info)[0] == ("t.logits", "FP32", [-1, 7])
    assert oip.task_outputs({**info, "num_classes": None})[0] == ("t.logits", "FP32", [-1, -1])
