"""Serving on Ray Serve: a real local Ray cluster (started here, torn down after) with the tiny test model."""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from test_serving import HEADS, TOKEN, _free_port, _png  # noqa: E402

import multitask_peft as mtp  # noqa: E402
from conftest import randomize  # noqa: E402
from multitask_peft import serving  # noqa: E402
from multitask_peft.run_config import RunConfig  # noqa: E402
from multitask_peft.rundir import RunDirectory  # noqa: E402

pytestmark = pytest.mark.ray


def _run_dir(root: Path) -> Path:
    """A run directory on the tiny ViT (64 px); its tasks are saved into `tasks/` by the fixture."""
    data = {"source": "imagefolder", "root": str(root / "unused"), "image_size": 64, "augment": "none"}
    task = {"head": {"type": "classification", "num_classes": 4}, "data": data}
    config = RunConfig.from_dict(
        {"backbone": {"name": "test_vit", "kwargs": {"img_size": 64}}, "tasks": {"cls": task}, "output": str(root)}
    )
    return RunDirectory.create(root, config).path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, mtp.MultiTaskModel]]:
    from multitask_peft.serving import ray as mtp_ray

    root = tmp_path_factory.mktemp("ray") / "run"
    run = _run_dir(root)
    model = RunDirectory(run).build_backbone()
    model.add_task("cls", mtp.tasks.Classification(num_classes=4), [mtp.peft.LoRA(r=4)])
    model.add_task("boxes", mtp.tasks.Detection(num_classes=3), [mtp.peft.SSF()])
    model.add_task("masks", mtp.tasks.Segmentation(num_classes=5), [mtp.peft.Pfeiffer(dim=6)])
    for k, name in enumerate(model.tasks):
        randomize(model.task(name), seed=k)
        model.save_task(name, run / "tasks" / name)
    port = _free_port()
    # A busy machine (CI) can take longer than Serve's 5 s to start the HTTP proxy, which it then kills.
    patient = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    saved = {k: os.environ.get(k) for k in patient}
    os.environ.update(patient)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = mtp_ray.build_app(run, replicas=2, max_resident=2, admin_token=TOKEN, replica_cpus=1, threads=1)
    serve.run(app, name="mtpeft", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not serving.Client(url).ready():
        assert time.monotonic() < deadline, "the Ray deployment did not become ready"
        time.sleep(0.5)
    try:
        yield url, run, model
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _predict(url: str, png: bytes, tasks: list[str]) -> dict:
    with serving.Client(url) as client:
        return client.predict(png, tasks, logits=True, mask_format="list")


def test_answers_equal_the_single_server(cluster: tuple) -> None:
    url, run, model = cluster
    from test_serving import _tensor

    for k, tasks in enumerate([["cls"], ["masks", "cls"], ["boxes", "masks"]]):  # (at most max_resident = 2)
        png = _png(seed=30 + k)
        out = _predict(url, png, tasks)
        expected = model.predict(_tensor(png)[None], tasks)
        for task in tasks:
            got, want = out["results"][task], expected[task][0]
            if HEADS[task] == "classification":
                assert got["label"] == want["label"]
                assert max(abs(a - b) for a, b in zip(got["logits"], want["logits"].tolist())) < 1e-4
            elif HEADS[task] == "detection":
                assert got["labels"] == want["labels"].tolist()
            else:
                assert (torch.tensor(got["mask"]) == want["mask"]).float().mean() >= 0.999
    # OIP v2 through the Ray ingress too
    meta = httpx.get(f"{url}/v2/models/ALL").json()
    assert {o["name"].split(".")[0] for o in meta["outputs"]} == set(HEADS)


def _replicas(url: str) -> list[dict]:
    time.sleep(2.5)  # (the ingress refreshes its view of the replicas every 2 s)
    return httpx.get(f"{url}/v1/tasks").json()["replicas"]


def test_routing_prefers_replicas_holding_the_tasks(cluster: tuple) -> None:
    url, _, _ = cluster
    png = _png(seed=1)
    for _ in range(10):  # a task exactly one replica holds (each holds at most 2 of the 3)
        replicas = _replicas(url)
        held = {t: [r["replica"] for r in replicas if t in r["resident"]] for t in HEADS}
        single = [t for t, holders in held.items() if len(holders) == 1]
        if single:
            break
        nobody = [t for t, holders in held.items() if not holders]
        _predict(url, png, [nobody[0] if nobody else "cls"])  # one replica loads it
    assert single, held
    task, holder = single[0], held[single[0]][0]
    before = {r["replica"]: r["batches"] for r in _replicas(url)}
    for k in range(6):
        _predict(url, _png(seed=k), [task])
    after = {r["replica"]: r["batches"] for r in _replicas(url)}
    ran = {r for r in after if after[r] > before.get(r, 0)}
    assert ran == {holder}, (task, holder, before, after)


def test_admin_load_reaches_every_replica(cluster: tuple) -> None:
    url, run, model = cluster
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{url}/v1/tasks", json={"path": "cls", "name": "cls2"}).status_code == 401
    r = httpx.post(f"{url}/v1/tasks", json={"path": "cls", "name": "cls2"}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    png = _png(seed=7)
    want = _predict(url, png, ["cls"])["results"]["cls"]["logits"]
    replicas = httpx.get(f"{url}/v1/tasks").json()["replicas"]
    assert len(replicas) == 2 and all(rep["version"] >= 1 for rep in replicas)
    for _ in range(6):  # answered by whichever replica: the same as the task it copies
        assert _predict(url, png, ["cls2"])["results"]["cls2"]["logits"] == pytest.approx(want, abs=1e-5)
    r = httpx.delete(f"{url}/v1/tasks/cls2", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    for _ in range(4):
        with serving.Client(url) as client, pytest.raises(serving.ServerError, match="cls2"):
            client.predict(png, ["cls2"])


def test_a_killed_replica_costs_no_request(cluster: tuple) -> None:
    url, _, _ = cluster
    replicas = httpx.get(f"{url}/v1/tasks").json()["replicas"]
    pids = [r["pid"] for r in replicas]
    failures: list[str] = []
    done = [0]

    def client(seed: int) -> None:
        for k in range(6):
            try:
                _predict(url, _png(seed=seed * 10 + k), ["cls", "boxes"])
                done[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not failures and done[0] == 24, failures[:3]
    deadline = time.monotonic() + 120  # the deployment heals: two replicas again, the dead one replaced
    while True:
        now = httpx.get(f"{url}/v1/tasks").json()["replicas"]
        if len(now) == 2 and pids[0] not in {r["pid"] for r in now}:
            break
        assert time.monotonic() < deadline, now
        time.sleep(1.0)


def test_overload_answers_429_with_retry_after(cluster: tuple) -> None:
    """Beyond `max_queue` requests in flight per replica the ingress answers 429 (with Retry-After), as one
    process does; nothing fails otherwise."""
    from multitask_peft.serving import ray as mtp_ray

    url, run, _ = cluster
    app = mtp_ray.build_app(run, replicas=1, max_queue=2, max_batch=1, replica_cpus=1, threads=1, name="tight")
    serve.run(app, name="tight", route_prefix="/tight")
    try:
        tight = f"{url}/tight"
        deadline = time.monotonic() + 120
        while not serving.Client(tight).ready():
            assert time.monotonic() < deadline, "the second application did not become ready"
            time.sleep(0.5)
        statuses: list[int] = []
        retry_after: list[str] = []
        png = _png(seed=3)

        def client() -> None:
            for _ in range(3):
                try:
                    _predict(tight, png, ["cls"])
                    statuses.append(200)
                except serving.ServerError as e:
                    statuses.append(e.status)
                    retry_after.append({k.lower(): v for k, v in e.headers.items()}.get("retry-after", ""))

        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(statuses) == 36 and set(statuses) == {200, 429}, sorted(statuses)
        assert all(r.isdigit() and int(r) >= 1 for r in retry_after)
    finally:
        serve.delete("tight")
        ray.kill(ray.get_actor("tight-task-registry", namespace=ray.get_runtime_context().namespace))


def test_the_ingress_takes_what_the_replicas_queue(cluster: tuple) -> None:
    """Serve's default `max_ongoing_requests` (5) on the ingress capped every batch at 5 images (0.37x the single
    server's throughput at 16 clients); the ingress takes more than the replicas' engines queue (it answers 429
    beyond that itself)."""
    from multitask_peft.serving import ray as mtp_ray

    _, run, _ = cluster
    for kwargs, replicas in (({"replicas": 3}, 3), ({"autoscale": (1, 4)}, 4)):
        app = mtp_ray.build_app(run, max_queue=64, name="probe", **kwargs)
        ingress = app._bound_deployment  # (Serve keeps the deployment of an application there)
        assert ingress.name == mtp_ray.INGRESS
        assert ingress.max_ongoing_requests == 2 * 64 * replicas
    ray.kill(ray.get_actor("probe-task-registry", namespace=ray.get_runtime_context().namespace))


def test_deployment_files_are_valid() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).parents[1] / "deploy" / "ray"
    config = yaml.safe_load((root / "serve_config.yaml").read_text())
    ServeDeploySchema.parse_obj(config)
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(inner)
    from multitask_peft.serving import ray as mtp_ray

    for app in (config["applications"][0], inner["applications"][0]):
        assert app["import_path"] == "multitask_peft.serving.ray:app_builder"
        allowed = set(inspect.signature(mtp_ray.build_app).parameters)
        assert set(app["args"]) <= allowed, set(app["args"]) - allowed
