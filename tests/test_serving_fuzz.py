"""Fuzzing the HTTP API: over 1000 malformed or odd requests built from its OpenAPI spec; no 5xx answers, and the
server still answers a good request correctly afterwards."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serving import TOKEN, LiveServer, _bomb_png, _engine, _png, _truncated_png  # noqa: E402

from multitask_peft import serving  # noqa: E402

EXAMPLES = 1100
FIELDS = ["image", "tasks", "score_threshold", "max_detections", "mask_format", "logits"]  # timeout_s: may 504
TASKS = ["cls", "boxes", "masks", "nope", "", "cls,masks", "../cls", "CLS", "cls" * 30, "\u00e9", "cls,,boxes"]

odd_numbers = st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400, -(10**30), 1e308, -0.0])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20) | odd_numbers,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
images = st.sampled_from([_png(seed=1), _png(seed=2, size=(17, 40)), _truncated_png(), _bomb_png(), b"", b"GIF89a"])
image_b64 = images.map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=30)
field_values = {
    "image": image_b64 | json_values,
    "path": st.sampled_from(["cls", "../x", "/etc", "x" * 300, "cls/../../..", "\x00", ""]) | json_values,
    "name": st.sampled_from(["cls", "cls2", "Bad Name", "x" * 100]) | json_values,
    "tasks": st.lists(st.sampled_from(TASKS), max_size=4) | st.sampled_from(TASKS) | json_values,
    "score_threshold": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "max_detections": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
    "mask_format": st.sampled_from(["png", "list", "gif", ""]) | json_values,
    "logits": st.booleans() | json_values,
}


@st.composite
def json_bodies(draw: Any) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from([*FIELDS, "path", "name", "extra", ""]), unique=True, max_size=7))
    body = {k: draw(field_values.get(k, json_values)) for k in keys}
    raw = json.dumps(body, allow_nan=True).encode()
    if draw(st.integers(0, 20)) == 0:  # deep nesting or a 5000-digit integer
        raw = draw(st.sampled_from([b"[" * 100_000 + b"]" * 100_000, b'{"image": ' + b"9" * 5000 + b"}"]))
    if draw(st.booleans()) and raw:  # sometimes break the JSON
        cut = draw(st.integers(0, len(raw) - 1))
        raw = raw[:cut]
    content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/json"]))
    return {"content": raw, "headers": {"content-type": content_type}}


@st.composite
def form_bodies(draw: Any) -> dict[str, Any]:
    files = {}
    if draw(st.booleans()):
        files["image"] = ("x.png", draw(images | st.binary(max_size=64)), draw(st.sampled_from(["image/png", "a/b"])))
    if draw(st.booleans()):
        files["tasks"] = ("t", b"cls", "text/plain")  # a file where a field belongs
    data = {}
    for key in draw(st.lists(st.sampled_from(FIELDS[1:]), unique=True, max_size=5)):
        value = draw(st.sampled_from(TASKS) if key == "tasks" else st.text(max_size=12))
        data[key] = value
    if not files:
        return {"data": data, "headers": {"content-type": "multipart/form-data; boundary=xyz"}}
    return {"data": data, "files": files}


raw_bodies = st.builds(
    lambda body, kind: {"content": body, "headers": {"content-type": kind}},
    st.binary(max_size=256),
    st.sampled_from(
        ["multipart/form-data", "multipart/form-data; boundary=--", "application/json", "image/png", "", "x" * 300]
    ),  # fmt: skip
)


@st.composite
def requests(draw: Any, operations: list[tuple[str, str]]) -> tuple[str, str, dict[str, Any]]:
    """Mostly the spec's own operations (predict most of all), sometimes a wrong method or an unknown path."""
    pick = draw(st.sampled_from(["predict"] * 6 + ["spec"] * 3 + ["other"]))
    if pick == "predict":
        method, path = "POST", "/v1/predict"
    elif pick == "spec":
        method, path = draw(st.sampled_from(operations))
    else:
        method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]))
        path = draw(st.sampled_from([p for _, p in operations] + ["/v1/predict/", "/nope", "/v2/models/{name}/infer"]))
    if "{name}" in path:
        name = draw(st.sampled_from(TASKS[:4]) | st.text(min_size=1, max_size=10))
        path = path.replace("{name}", urllib.parse.quote(name, safe=""))
    kind = draw(st.sampled_from(["json", "json", "form", "form", "raw", "none"]))
    kwargs = {"json": json_bodies, "form": form_bodies, "raw": lambda: raw_bodies, "none": lambda: st.just({})}[kind]()
    kwargs = dict(draw(kwargs))
    if draw(st.booleans()):
        auth = draw(st.sampled_from([f"Bearer {TOKEN}", "Bearer nope", "Basic abc", "", "Bearer"]))
        kwargs["headers"] = {**kwargs.get("headers", {}), "authorization": auth}
    return method, path, kwargs


def test_fuzz_no_server_errors(tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_serving import _build

    model, root = _build(tmp_path_factory.mktemp("fuzz"))
    with LiveServer(_engine(root, max_batch=8, max_wait_ms=1), max_body_bytes=2**16) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        spec = client.get("/openapi.json").json()
        operations = [(m.upper(), p) for p, item in spec["paths"].items() for m in item]
        statuses: list[int] = []
        failures: list[str] = []

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(requests(operations))
        def fuzz(request: tuple[str, str, dict[str, Any]]) -> None:
            method, path, kwargs = request
            if path.startswith("/v1/tasks/") and method == "DELETE":  # never unload the tasks under test
                kwargs.setdefault("headers", {})["authorization"] = "Bearer nope"
            response = client.request(method, path, **kwargs)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{method} {path} {kwargs!r:.300} -> {response.status_code} {response.text[:200]}")

        fuzz()
        assert len(statuses) >= 1000
        assert not failures, failures[:5]
        assert sum(200 <= s < 300 for s in statuses) > 20  # some requests were good ones
        assert sum(s in (400, 413, 415, 422) for s in statuses) > 300  # most went deep enough to be judged
        with serving.Client(server.url) as good:  # still serving, correctly
            png = _png(seed=9)
            out = good.predict(png, ["cls"], logits=True)["results"]["cls"]
            from test_serving import _tensor

            expected = model.predict(_tensor(png)[None], "cls")["cls"][0]
            assert out["label"] == expected["label"]
            assert abs(out["logits"][0] - float(expected["logits"][0])) < 1e-4
