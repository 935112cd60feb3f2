"""Serving pins: behaviour of the HTTP server that the other serving tests leave open, checked by value.

- a failing batch is retried request by request (the requests provably shared that batch);
- requests of one batch with different image sizes and options each get their own answer;
- a corrupt image in the middle of a batch fails alone;
- an evicted task whose files changed comes back as a new version with the new weights;
- boxes and masks come back in the pixels of the sent image (non-square; EXIF-rotated JPEGs: upright pixels).

Expected answers are computed without the server's code: PIL's bilinear resize to the model size, normalisation,
`model.predict`, then the documented rescaling (boxes: x by w / 64, y by h / 64; masks: nearest to (h, w)).

Everything goes through HTTP (`serving.Client` / httpx) and public metrics, except `BatchProbe` below: the one
internal touch point, to retarget there if the engine or the backends change. Servers are built by
`test_serving._engine` (store + backend + engine), shared with test_serving.py; test setup also reaches into the
reference model once (`_spread_mask_classes`, guarded by an assertion that fails loudly if it stops working).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from test_serving import MEAN, SIZE, STD, LiveServer, _engine, _histogram, _metric, _post  # noqa: E402

import multitask_peft as mtp  # noqa: E402
from conftest import make_model, randomize  # noqa: E402
from multitask_peft import serving  # noqa: E402

WAIT_S = 30.0  # generous bound of every explicit wait (a wait that runs out fails the test, it never passes it)


# --- the one internal touch point -----------------------------------------------------------------------------
class BatchProbe:
    """Wraps `engine.backend.run(images, tasks)`: the call that runs one forward pass on the engine's worker thread,
    with the batch's decoded images (those that reached the model) and the task names of each.

    - `batches`: the task lists of every call, in order (one entry per image);
    - `hold()`: the next call waits until `release()`, so requests sent meanwhile queue up and form the next batch;
    - `fail_tasks`: a call whose batch holds one of these tasks raises (a forward pass that fails).

    If the engine stops calling `engine.backend.run`, retarget this class (and only this class).
    """

    def __init__(self, engine: serving.Engine, fail_tasks: tuple[str, ...] = ()) -> None:
        self.fail_tasks = set(fail_tasks)
        self.batches: list[list[list[str]]] = []
        self.holding = threading.Event()  # set while a held call waits
        self._release = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        self._inner = engine.backend.run
        engine.backend.run = self._run

    def _run(self, images: torch.Tensor, tasks: list[list[str]]) -> Any:
        with self._lock:
            self.batches.append([list(names) for names in tasks])
            hold, self._armed = self._armed, False
        if hold:
            self.holding.set()
            if not self._release.wait(WAIT_S):
                raise RuntimeError("BatchProbe: held batch never released")
        if any(t in self.fail_tasks for names in tasks for t in names):
            raise RuntimeError(f"BatchProbe: failing a batch with a task in {sorted(self.fail_tasks)}")
        return self._inner(images, tasks)

    def hold(self) -> None:
        self.holding.clear()
        self._release.clear()
        with self._lock:
            self._armed = True

    def release(self) -> None:
        with self._lock:
            self._armed = False
        self._release.set()


# --- reference model and images -------------------------------------------------------------------------------
HEADS = {"cls": "classification", "boom": "classification", "boxes": "detection", "masks": "segmentation"}
CLASS_NAMES = ("a", "b", "c", "d")


def _spread_mask_classes(model: mtp.MultiTaskModel, task: str) -> None:
    """Make the segmentation task's masks vary over the image (with random weights they are one class everywhere,
    which could not catch a misplaced or mis-sized mask): the last 1x1 conv of its head (the classifier) gets no
    bias and weights orthogonal to the mean feature, so the argmax follows the features' variation."""
    convs = [m for m in model.task(task).modules() if isinstance(m, torch.nn.Conv2d)]
    classifier = convs[-1]
    seen: list[torch.Tensor] = []
    handle = classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    model.predict(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), task)
    handle.remove()
    with torch.no_grad():
        mean = seen[0].mean(dim=(0, 2, 3))
        weight = classifier.weight[:, :, 0, 0]
        weight -= (weight @ mean)[:, None] * mean[None] / (mean @ mean)
        classifier.bias.zero_()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[mtp.MultiTaskModel, Path]:
    """A model with `cls`, `boxes` (several boxes per image: score_thresh 0.15), `masks` (several classes per
    image) and `boom` (a copy of `cls` whose batches the probe fails), saved under `tmp/tasks`."""
    model, size = make_model("vit")
    assert size == SIZE
    model.add_task("cls", head=mtp.tasks.Classification(num_classes=4, class_names=CLASS_NAMES),
                   peft=[mtp.peft.LoRA(r=4)])  # fmt: skip
    model.add_task("boxes", head=mtp.tasks.Detection(num_classes=3, score_thresh=0.15), peft=[mtp.peft.SSF()])
    model.add_task("masks", head=mtp.tasks.Segmentation(num_classes=5), peft=[mtp.peft.Pfeiffer(dim=6)])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k)
    _spread_mask_classes(model, "masks")
    mask = model.predict(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)), "masks")
    assert len(torch.unique(mask["masks"][0]["mask"])) >= 3, "the masks must vary over the image"
    root = tmp_path_factory.mktemp("serving_pins") / "tasks"
    for name in model.tasks:
        model.save_task(name, root / name)
    model.save_task("cls", root / "boom")
    return model, root


@pytest.fixture(scope="module")
def server(reference: tuple[mtp.MultiTaskModel, Path]) -> Iterator[tuple[LiveServer, BatchProbe]]:
    _, root = reference
    engine = _engine(root, max_batch=16, max_wait_ms=5)
    probe = BatchProbe(engine, fail_tasks=("boom",))
    with LiveServer(engine) as live:
        yield live, probe


def _array(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _form(data: bytes, tasks: list[str], **options: Any) -> dict[str, Any]:
    """httpx.post keyword arguments of a multipart predict request (as `serving.Client` sends it)."""
    fields = {"tasks": ",".join(tasks)}
    for key, value in options.items():
        fields[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return {"files": {"image": ("image", data, "application/octet-stream")}, "data": fields}


# --- expected answers, computed without the server's code -----------------------------------------------------
def _expected(
    model: mtp.MultiTaskModel, upright: np.ndarray, tasks: list[str], options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The answer for an image whose upright pixels are `upright` (h, w, 3): resized to the model size by the
    training data's evaluation transform (torchvision's antialiased bilinear resize), normalised, `model.predict`;
    then options applied and results put in the image's pixels as documented (boxes: x * w / 64, y * h / 64;
    masks: nearest-resized to (h, w))."""
    from multitask_peft.tasks.data import eval_transforms

    options = options or {}
    h, w = upright.shape[:2]
    small = eval_transforms((SIZE, SIZE))(torch.from_numpy(np.ascontiguousarray(upright)).permute(2, 0, 1))
    x = small.float() / 255
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    raw = model.predict(x[None], tasks)
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        r = raw[task][0]
        if HEADS[task] == "classification":
            label = int(r["logits"].argmax())
            e: dict[str, Any] = {"label": label, "score": float(r["score"]), "class_name": CLASS_NAMES[label]}
            if options.get("logits"):
                e["logits"] = r["logits"].tolist()
        elif HEADS[task] == "detection":
            keep = [i for i, s in enumerate(r["scores"].tolist()) if s >= options.get("score_threshold", 0.0)]
            keep = keep[: options.get("max_detections")]
            scale = torch.tensor([w / SIZE, h / SIZE, w / SIZE, h / SIZE])
            e = {
                "boxes": (r["boxes"][keep] * scale).tolist(),
                "scores": r["scores"][keep].tolist(),
                "labels": r["labels"][keep].tolist(),
            }
        else:
            mask = F.interpolate(r["mask"][None, None].float(), size=(h, w), mode="nearest")[0, 0].long().numpy()
            e = {"size": [h, w], "mask" if options.get("mask_format") == "list" else "mask_png": mask}
        out[task] = e
    return out


def _assert_detections(got: dict[str, Any], exp: dict[str, Any], where: str) -> None:
    """Same detections: scores in order; boxes (in the image's pixels) and labels equal, up to the order of
    detections whose scores tie within 1e-4 (a batch may reorder exact ties)."""
    scores = exp["scores"]
    assert len(got["scores"]) == len(scores) == len(got["boxes"]) == len(got["labels"]), where
    np.testing.assert_allclose(got["scores"], scores, atol=1e-4, err_msg=where)
    start = 0
    while start < len(scores):
        end = start + 1
        while end < len(scores) and scores[end - 1] - scores[end] < 1e-4:
            end += 1
        left = list(range(start, end))
        for i in range(start, end):
            match = next(
                (
                    j
                    for j in left
                    if got["labels"][i] == exp["labels"][j]
                    and np.allclose(got["boxes"][i], exp["boxes"][j], rtol=0, atol=5e-3)
                ),
                None,
            )
            assert match is not None, f"{where}: detection {i} {got['boxes'][i]} label {got['labels'][i]} not in " + (
                f"{[(exp['boxes'][j], exp['labels'][j]) for j in left]}"
            )
            left.remove(match)
        start = end


def _assert_answer(got: dict[str, Any], exp: dict[str, Any], head: str, where: str) -> None:
    assert set(got) == set(exp), f"{where}: keys {sorted(got)} != {sorted(exp)}"
    if head == "classification":
        assert got["label"] == exp["label"] and got["class_name"] == exp["class_name"], where
        assert got["score"] == pytest.approx(exp["score"], abs=1e-4), where
        if "logits" in exp:
            np.testing.assert_allclose(got["logits"], exp["logits"], atol=1e-4, err_msg=where)
    elif head == "detection":
        _assert_detections(got, exp, where)
    else:
        assert got["size"] == exp["size"], where
        if "mask" in exp:
            mask, want = np.asarray(got["mask"]), exp["mask"]
        else:
            mask, want = serving.decode_mask_png(got["mask_png"]), exp["mask_png"]
        assert mask.shape == want.shape, f"{where}: mask {mask.shape} != {want.shape}"
        assert (mask == want).mean() >= 0.99, f"{where}: masks agree on {(mask == want).mean():.3f} of the pixels"


def _assert_results(out: dict[str, Any], exp: dict[str, dict[str, Any]], where: str) -> None:
    assert list(out["results"]) == list(exp), where
    for task, expected in exp.items():
        _assert_answer(out["results"][task], expected, HEADS[task], f"{where} / {task}")


def _cuts(scores: list[float], gap: float = 2e-3) -> list[tuple[int, float]]:
    """(k, threshold) pairs that keep the best k detections, where the k-th and (k+1)-th scores differ by more than
    `gap` (so batch noise cannot move a detection across the cut); threshold: halfway between them."""
    return [(k, (scores[k - 1] + scores[k]) / 2) for k in range(1, len(scores)) if scores[k - 1] - scores[k] > gap]


# --- driving requests -----------------------------------------------------------------------------------------
def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _queue_depth(url: str) -> float:
    return _metric(httpx.get(f"{url}/metrics").text, "mtp_queue_depth")


def _one_batch(
    live: LiveServer, probe: BatchProbe, requests: list[dict[str, Any]]
) -> tuple[list[httpx.Response], list[list[list[str]]]]:
    """Send `requests` (httpx.post keyword arguments) so that they form one batch, in this order: a blocker request
    (`cls` on one image) is held in its forward pass while they are sent one by one, each once the previous one is
    queued (the public `mtp_queue_depth` gauge); then the blocker is released and the queued requests form the next
    batch. Returns their responses and the batches the backend ran from the blocker's on."""
    first = len(probe.batches)
    answers: list[Any] = [None] * (len(requests) + 1)

    def send(i: int, kwargs: dict[str, Any]) -> None:
        try:
            answers[i] = _post(live.url, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            answers[i] = e

    threads: list[threading.Thread] = []
    probe.hold()
    try:
        for i, kwargs in enumerate([_form(_encode(_array(0, SIZE, SIZE)), ["cls"]), *requests]):
            thread = threading.Thread(target=send, args=(i, kwargs))
            threads.append(thread)
            thread.start()
            if i == 0:
                _wait_for(lambda: probe.holding.is_set() or not threads[0].is_alive(), "the blocker's forward pass")
                assert probe.holding.is_set(), f"the blocker was answered before its forward pass: {answers[0]}"
            else:
                _wait_for(lambda i=i: _queue_depth(live.url) == i or not threads[i].is_alive(), f"request {i} queued")
                assert threads[i].is_alive(), f"request {i} was answered before the batch ran: {answers[i]}"
    finally:
        probe.release()
        for thread in threads:
            thread.join(WAIT_S)
    assert all(isinstance(a, httpx.Response) for a in answers), answers
    assert answers[0].status_code == 200, answers[0].text
    assert probe.batches[first] == [["cls"]], "the blocker ran alone"
    return answers[1:], probe.batches[first:]


# --- the pins -------------------------------------------------------------------------------------------------
def test_failed_batch_is_retried_request_by_request(server: tuple, reference: tuple) -> None:
    """A forward pass that fails for a batch of three requests (one of them asks for `boom`, which fails any batch
    it is in) is retried request by request: the two good requests around it get 200 with their correct results,
    the bad one alone gets 500, and each retry ran as a batch of one."""
    live, probe = server
    model, _ = reference
    good1, good2 = _array(11, 48, 96), _array(12, SIZE, SIZE)
    requests = [
        _form(_encode(good1), ["cls", "boxes"], logits=True),
        _form(_encode(_array(13, SIZE, SIZE)), ["boom"]),
        _form(_encode(good2), ["masks", "cls"]),
    ]
    responses, batches = _one_batch(live, probe, requests)
    assert batches[1] == [["cls", "boxes"], ["boom"], ["masks", "cls"]], f"not one batch of the three: {batches}"
    assert [r.status_code for r in responses] == [200, 500, 200], [r.text for r in responses]
    assert sorted(batches[2:]) == sorted([names] for names in batches[1]), f"not retried one by one: {batches}"
    assert responses[1].json()["error"]["code"] == 500
    _assert_results(responses[0].json(), _expected(model, good1, ["cls", "boxes"], {"logits": True}), "good 1")
    _assert_results(responses[2].json(), _expected(model, good2, ["masks", "cls"]), "good 2")


def test_one_batch_of_different_sizes_and_options(server: tuple, reference: tuple) -> None:
    """Four requests in one batch, each with its own image size (none square but one) and its own options
    (score_threshold, max_detections, mask_format png / list, logits on / off): each answer equals what that
    request alone should get (image_size, detections cut and scaled to its pixels, mask form and size, logits)."""
    live, probe = server
    model, _ = reference
    images = {"A": _array(21, 48, 96), "B": _array(22, 80, 40), "C": _array(23, SIZE, SIZE), "D": _array(24, 50, 120)}
    tasks = ["cls", "boxes", "masks"]
    cuts = {k: _cuts(_expected(model, a, ["boxes"])["boxes"]["scores"]) for k, a in images.items()}
    assert all(len(c) >= 2 for c in cuts.values()), f"too few well-separated detections to cut: {cuts}"
    options = {
        "A": {"logits": True},
        "B": {"mask_format": "list", "max_detections": cuts["B"][0][0]},
        "C": {"mask_format": "list", "logits": True, "score_threshold": round(cuts["C"][1][1], 6)},
        "D": {"score_threshold": round(cuts["D"][1][1], 6), "max_detections": cuts["D"][0][0]},
    }
    requests = [_form(_encode(images[k]), tasks, **options[k]) for k in images]
    responses, batches = _one_batch(live, probe, requests)
    assert batches[1:] == [[tasks] * 4], f"the four requests did not run as one batch: {batches}"
    for key, response in zip(images, responses):
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["image_size"] == list(images[key].shape[:2]), key
        assert out["versions"] == dict.fromkeys(tasks, 1), key
        _assert_results(out, _expected(model, images[key], tasks, options[key]), f"request {key}")


def test_corrupt_image_in_a_batch_fails_alone(server: tuple, reference: tuple) -> None:
    """A truncated image (a valid header, so it is queued) between two good ones in one batch: it alone gets 400;
    the others get 200 with their correct results. All three ran as one batch (a batch of 3 in the public
    `mtp_batch_size` histogram; only the two good images reached the model)."""
    live, probe = server
    model, _ = reference
    good1, good2 = _array(31, 48, 96), _array(32, 80, 40)
    truncated = _encode(_array(33, SIZE, SIZE))[:200]
    before = _histogram(httpx.get(f"{live.url}/metrics").text, "mtp_batch_size")
    requests = [
        _form(_encode(good1), ["cls", "boxes", "masks"], logits=True),
        _form(truncated, ["cls"]),
        _form(_encode(good2), ["boxes", "masks"], mask_format="list"),
    ]
    responses, batches = _one_batch(live, probe, requests)
    after = _histogram(httpx.get(f"{live.url}/metrics").text, "mtp_batch_size")
    assert (after["count"] - before["count"], after["sum"] - before["sum"]) == (2, 4), (
        f"expected the blocker, then one batch of the three requests: {before} -> {after}"
    )
    assert [r.status_code for r in responses] == [200, 400, 200], [r.text for r in responses]
    assert batches[1:] == [[["cls", "boxes", "masks"], ["boxes", "masks"]]], (
        f"only the good images reach the model, once: {batches}"
    )
    assert responses[1].json()["error"]["code"] == 400
    _assert_results(responses[0].json(), _expected(model, good1, ["cls", "boxes", "masks"], {"logits": True}), "1")
    exp2 = _expected(model, good2, ["boxes", "masks"], {"mask_format": "list"})
    _assert_results(responses[2].json(), exp2, "good 2")
    assert responses[2].json()["image_size"] == [80, 40]


def test_evicted_task_with_changed_files_comes_back_as_new_version(reference: tuple, tmp_path: Path) -> None:
    """With max_resident=1: a task evicted and asked for again with unchanged files keeps its version and results;
    once its files are rewritten (other weights) while it is evicted, asking for it again serves version 2 with the
    new weights' results (and /v1/tasks shows the new version and digest)."""
    model, _ = reference
    root = tmp_path / "tasks"
    for name in ("cls", "masks"):
        model.save_task(name, root / name)
    new, _ = make_model("vit")
    new.add_task("cls", head=mtp.tasks.Classification(num_classes=4, class_names=CLASS_NAMES),
                 peft=[mtp.peft.LoRA(r=4)])  # fmt: skip
    randomize(new.task("cls"), seed=99)
    image = _array(41, SIZE, SIZE)
    old_logits = _expected(model, image, ["cls"], {"logits": True})["cls"]
    new_logits = _expected(new, image, ["cls"], {"logits": True})["cls"]
    assert not np.allclose(old_logits["logits"], new_logits["logits"], atol=1e-2), "the new weights must differ"
    png = _encode(image)

    def resident(client: serving.Client) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in client.tasks()}

    with LiveServer(_engine(root, max_resident=1, max_wait_ms=1)) as live, serving.Client(live.url) as client:
        out = client.predict(png, ["cls"], logits=True)
        assert out["versions"] == {"cls": 1}
        _assert_results(out, {"cls": old_logits}, "v1")
        digest = resident(client)["cls"]["digest"]
        for _ in range(2):  # evict `cls`, then ask for it again: unchanged files, same version
            client.predict(png, ["masks"])
            assert not resident(client)["cls"]["resident"], "`masks` did not evict `cls`"
            out = client.predict(png, ["cls"], logits=True)
            assert out["versions"] == {"cls": 1}, "unchanged files must keep the version"
            _assert_results(out, {"cls": old_logits}, "v1 reloaded")
        client.predict(png, ["masks"])
        assert not resident(client)["cls"]["resident"]
        new.save_task("cls", root / "cls")  # new weights over the evicted task's files
        out = client.predict(png, ["cls"], logits=True)
        assert out["versions"] == {"cls": 2}, "changed files must come back as a new version"
        _assert_results(out, {"cls": new_logits}, "v2")
        info = resident(client)["cls"]
        assert info["version"] == 2 and info["resident"] and info["digest"] != digest
        assert client.predict(png, ["cls"], logits=True)["versions"] == {"cls": 2}


def test_boxes_and_masks_in_the_pixels_of_a_non_square_image(server: tuple, reference: tuple) -> None:
    """A 96 x 48 (w x h) PNG on the 64 x 64 model: image_size is [48, 96], box x coordinates are scaled by 96 / 64
    and y by 48 / 64 (checked by value against model.predict on the bilinear-resized image), the mask is 48 x 96."""
    live, _ = server
    model, _ = reference
    image = _array(51, 48, 96)
    expected = _expected(model, image, ["boxes", "masks"])
    assert len(expected["boxes"]["scores"]) >= 4, "the test needs several boxes"
    assert len(np.unique(expected["masks"]["mask_png"])) >= 3, "the test needs a mask that varies"
    with serving.Client(live.url) as client:
        out = client.predict(_encode(image), ["boxes", "masks"])
    assert out["image_size"] == [48, 96]
    _assert_results(out, expected, "96x48 png")


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_answers_in_upright_pixels(server: tuple, reference: tuple, orientation: int) -> None:
    """A JPEG stored 48 wide x 96 high with EXIF orientation 6 (shown rotated 90 degrees clockwise) or 8 (counter-
    clockwise), so upright it is 96 wide x 48 high: image_size is the upright [48, 96]; boxes and the mask are in
    upright pixels and equal model.predict on the upright image (rotated here with numpy, not with PIL's EXIF
    handling)."""
    live, _ = server
    model, _ = reference
    stored = _array(60 + orientation, 96, 48)
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # the stored pixels, as decoded
    upright = np.ascontiguousarray(np.rot90(pixels, k=-1 if orientation == 6 else 1))
    assert upright.shape[:2] == (48, 96)
    expected = _expected(model, upright, ["boxes", "masks"])
    assert len(expected["boxes"]["scores"]) >= 4, "the test needs several boxes"
    assert len(np.unique(expected["masks"]["mask_png"])) >= 3, "the test needs a mask that varies"
    with serving.Client(live.url) as client:
        out = client.predict(jpeg, ["boxes", "masks"])
    assert out["image_size"] == [48, 96]
    _assert_results(out, expected, f"jpeg, orientation {orientation}")


def test_unvalidated_scan_reloads_unchanged_files_as_the_same_version(reference: tuple) -> None:
    """After `scan(validate=False)` (folders registered, not read), a task's first load is its version 1 (it used to
    be compared against an empty digest and served as a changed version 2)."""
    import asyncio

    _, root = reference
    model, _ = make_model("vit")
    store = serving.AdapterStore(model, root, max_resident=1)
    store.scan(validate=False)
    assert store.entries and not any(e.resident for e in store.entries.values())
    name = next(iter(store.entries))
    asyncio.run(store.make_resident([name]))
    assert store.entries[name].resident and store.entries[name].version == 1 and store.entries[name].digest
