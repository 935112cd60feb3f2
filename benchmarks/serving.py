"""Serving throughput and latency on loopback vs offline batched inference; task load time from disk.

One model: ViT-S/16 at 224 px (random weights) with three LoRA classification tasks (r=8 on qkv / proj / fc1 /
fc2, the tasks' weights saved as task folders). The server runs in its own process (`multitask_peft.serving`:
engine + FastAPI app on uvicorn, torch on all cores, max batch 16, max wait 25 ms: a batch waits only while it is
smaller than the concurrency seen, so a lone client never waits) with either backend:

- torch: `TorchBackend` (the model, each image runs only its requested task);
- onnx: `OnnxBackend` over the same model exported with `mtp.export_onnx` (the graph computes all three tasks
  for every image, as exported graphs do).

Clients (this process: a lean asyncio HTTP/1.1 load generator with keep-alive connections, closed loop: each
client sends its next request when the previous one is answered) upload the same 224 x 224 JPEG photo
(`skimage.data.astronaut`) as multipart, each request asking for one task, the tasks in rotation. For 1, 4 and 16
clients: throughput (requests/s over the timed window) and p50 / p99 latency.

Offline baseline, timed in this process while the server idles, with the same thread count: the backend's own
batched call on already-preprocessed images (`model.predict_each` with the same task rotation; `OnnxRunner.run`),
images/s from the median of repeats, at the batch size the server actually ran (its mean, from `/metrics`) and
at batch size = the number of clients. Closed-loop clients settle into two alternating groups (while one batch
runs, the other half of the clients queue up the next one), so 16 clients give batches of about 8. Goal: at 16
clients the server reaches >= 0.85x the offline throughput at the same batch size, with p99 <= 3x p50.

Task load time: `POST /v1/tasks` (admin API: path check, read + validate the safetensors file, build the task,
swap it in on the worker thread between batches) of a saved ViT-S LoRA task into the idle torch server, and
`model.read_task` + `attach_task` in this process; goal p50 <= 50 ms.

    python benchmarks/serving.py                     # both backends, 1 / 4 / 16 clients
    python benchmarks/serving.py --quick             # smoke test: timm's test_vit at 64 px, few requests
    python benchmarks/serving.py --backends torch --json out.json
    python benchmarks/serving.py --ray               # the single torch server vs Ray Serve with 1 and 2 replicas

With `--ray`: the same load against the single torch server, then against `mtpeft serve --ray`'s application
(`multitask_peft.serving.ray`, a local Ray cluster in this process) with 1 replica (all threads) and 2 replicas
(the threads split between them): throughput and latency per client count, and Ray with 1 replica / single server
at the largest client count (goal: >= 0.85x, i.e. at most 15 % lower).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# `python benchmarks/serving.py` puts benchmarks/ first on sys.path, where benchmarks/onnx.py would shadow the onnx
# package that the export imports: drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import multitask_peft as mtp  # noqa: E402

GOAL_THROUGHPUT = 0.85  # server / offline at 16 clients
GOAL_TAIL = 3.0  # p99 / p50 at 16 clients
GOAL_LOAD_MS = 50.0  # p50 of loading a ViT-S LoRA task
TASKS = ("cls0", "cls1", "cls2")
MEAN = STD = (0.5, 0.5, 0.5)
TOKEN = "bench"
MODELS = {False: ("vit_small_patch16_224", {}, 224), True: ("test_vit", {"img_size": 64}, 64)}

SERVER = """
import sys, torch, uvicorn
import multitask_peft as mtp
from multitask_peft import serving
name, kwargs, size, root, backend, port, threads = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \\
    sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
max_batch, max_wait_ms = int(sys.argv[8]), float(sys.argv[9])
torch.set_num_threads(threads)
worker = serving.Worker()
def build():
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(name, **kwargs)
    store = serving.AdapterStore(model, root)
    store.scan()
    return serving.TorchBackend(model, store, serving.Preprocess((size, size), (0.5,) * 3, (0.5,) * 3), "cpu")
if backend == "torch":
    runner = worker.call(build)  # on the thread that will run it
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    runner = serving.OnnxBackend(root + "/model.onnx", ["CPUExecutionProvider"], options)
config = serving.EngineConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=1024)
engine = serving.Engine(runner, config, worker=worker)
app = serving.create_app(engine, admin_token="bench")
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, help="timed requests per client count (default 96; quick 24)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / ORT threads (server, offline)")
    p.add_argument("--repeats", type=int, default=9, help="offline repeats (median)")
    p.add_argument("--max-batch", type=int, default=16, help="server: most images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=25.0, help="server: longest wait of a batch for more requests")
    p.add_argument("--loads", type=int, default=20, help="task loads timed (p50)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="environment of the server")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="smoke test: test_vit at 64 px")
    p.add_argument("--ray", action="store_true", help="single torch server vs Ray Serve (1 and 2 replicas)")
    args = p.parse_args(argv)
    args.requests = args.requests or (24 if args.quick else 96)
    if min(args.clients) < 1 or args.requests < max(args.clients) or args.threads < 1:
        raise SystemExit("--clients must be >= 1, --requests >= the largest client count, --threads >= 1")
    return args


def build(root: Path, quick: bool, export: bool) -> tuple[mtp.MultiTaskModel, int]:
    """The model with three LoRA tasks (noisy, so no adapter is an identity), saved under `root`; exported too."""
    name, kwargs, size = MODELS[quick]
    torch.manual_seed(0)
    model = mtp.MultiTaskModel.from_timm(name, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for task in TASKS:
        model.add_task(task, head=mtp.tasks.Classification(num_classes=10), peft=[mtp.peft.LoRA(r=8)])
        with torch.no_grad():
            for param in model.trainable_parameters(task):
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        model.save_task(task, root / task)
    if export:
        print("exporting the ONNX graph ...", flush=True)
        mtp.export_onnx(model, root / "model.onnx", tasks=list(TASKS), image_size=size, mean=MEAN, std=STD)
    return model.eval(), size


def photo(size: int) -> tuple[bytes, torch.Tensor]:
    """A real photo as a JPEG at the model size, and the normalised tensor the server makes of it."""
    import skimage.data
    from PIL import Image

    from multitask_peft.serving import Preprocess

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BILINEAR).save(
        buffer, format="JPEG", quality=90
    )
    data = buffer.getvalue()
    tensor, _ = Preprocess((size, size), MEAN, STD).decode(data)
    return data, tensor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, backend: str, root: Path) -> tuple[subprocess.Popen, str]:
    from multitask_peft.serving import Client

    name, kwargs, size = MODELS[args.quick]
    port = free_port()
    argv = [name, repr(kwargs), str(size), str(root), backend, str(port), str(args.threads), str(args.max_batch)]
    argv.append(str(args.max_wait_ms))
    env = dict(os.environ, **dict(item.split("=", 1) for item in args.server_env))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *argv], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not Client(url).ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {backend} server did not start")
        time.sleep(0.1)
    return proc, url


async def load_test(url: str, image: bytes, clients: int, total: int) -> dict[str, Any]:
    """`clients` closed-loop clients sending `total` requests in all (after one warm-up round each).

    The clients are a lean load generator (like wrk or hey): raw HTTP/1.1 keep-alive connections sending
    pre-built multipart requests, so that they take little of the 2 cores they share with the server (httpx's
    async client cost about 12 ms of CPU per request here, a tenth of a forward pass).
    """
    host, port = url.removeprefix("http://").split(":")
    boundary = "mtpbenchboundary"
    requests = {}
    for task in TASKS:
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="tasks"\r\n\r\n{task}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        requests[task] = head.encode() + body
    latencies: list[float] = []
    errors: list[int] = []

    async def client(k: int, count: int, record: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(count):
                start = time.perf_counter()
                writer.write(requests[TASKS[(k + i) % len(TASKS)]])
                await writer.drain()
                header = await reader.readuntil(b"\r\n\r\n")
                status = int(header.split(b" ", 2)[1])
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in header.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                if status != 200 or b'"results"' not in body:
                    errors.append(status)
                elif record:
                    latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(client(k, 2, False) for k in range(clients)))  # warm-up
    start = time.perf_counter()
    await asyncio.gather(*(client(k, total // clients, True) for k in range(clients)))
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {sorted(set(errors))}")
    p50, p99 = np.percentile(latencies, [50, 99])
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "p50_ms": float(1000 * p50),
        "p99_ms": float(1000 * p99),
    }


def batch_stats(url: str) -> dict[str, float]:
    from multitask_peft.serving import Client

    values = {}
    for line in Client(url).metrics().splitlines():
        for metric in ("batch_size", "batch_seconds"):
            for part in ("sum", "count"):
                if line.startswith(f"mtp_{metric}_{part} "):
                    values[f"{metric}_{part}"] = float(line.split()[1])
    return values


def offline(
    args: argparse.Namespace, backend: str, model: mtp.MultiTaskModel, root: Path, image: torch.Tensor, batch: int
) -> float:
    """Images/s of the backend's own batched call at `batch` (median of `--repeats`)."""
    images = image.expand(batch, -1, -1, -1).contiguous()
    if backend == "torch":
        tasks = [[TASKS[i % len(TASKS)]] for i in range(batch)]

        def call() -> object:
            return model.predict_each(images, tasks)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        runner = mtp.OnnxRunner(root / "model.onnx", ["CPUExecutionProvider"], options)
        array = images.numpy()

        def call() -> object:
            return runner.run(array)

    with torch.inference_mode():
        call()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def task_loads(args: argparse.Namespace, url: str, model: mtp.MultiTaskModel, root: Path) -> dict[str, float]:
    """p50 ms of loading a saved LoRA task: through the admin API into the idle server, and in process."""
    from multitask_peft.serving import Client

    with Client(url, admin_token=TOKEN) as client:
        http = []
        for i in range(args.loads):
            start = time.perf_counter()
            client.load_task(TASKS[0], name=f"extra{i % 2}")  # load, then replace: a swap on every second call
            http.append(time.perf_counter() - start)
    direct = []
    for _ in range(args.loads):
        start = time.perf_counter()
        task = model.read_task(root / TASKS[0], "extra")
        model.attach_task(task)
        direct.append(time.perf_counter() - start)
        model.remove_task("extra")
    return {"http_p50_ms": 1000 * statistics.median(http), "in_process_p50_ms": 1000 * statistics.median(direct)}


def ray_comparison(args: argparse.Namespace, root: Path, jpeg: bytes) -> dict[str, Any]:
    """The single torch server, then the Ray application with 1 and 2 replicas, under the same load."""
    import ray
    from ray import serve

    from multitask_peft.run_config import RunConfig
    from multitask_peft.rundir import RunDirectory
    from multitask_peft.serving import Client
    from multitask_peft.serving import ray as serving_ray

    name, kwargs, size = MODELS[args.quick]
    data = {"source": "imagefolder", "root": str(root / "unused"), "image_size": size, "augment": "none"}
    task = {"head": {"type": "classification", "num_classes": 10}, "data": data}
    config = {"backbone": {"name": name, "kwargs": kwargs}, "tasks": {TASKS[0]: task}, "output": str(root / "run")}
    run = RunDirectory.create(root / "run", RunConfig.from_dict(config))
    for t in TASKS:
        (run.tasks_dir / t).mkdir(parents=True, exist_ok=True)
        for f in (root / t).iterdir():
            (run.tasks_dir / t / f.name).write_bytes(f.read_bytes())
    rows: dict[str, list[dict[str, Any]]] = {}
    proc, url = start_server(args, "torch", root)
    try:
        rows["single server"] = [asyncio.run(load_test(url, jpeg, c, args.requests)) for c in args.clients]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, logging_level="ERROR")
    try:
        for replicas in (1, 2):
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            threads = max(1, args.threads // replicas)
            app = serving_ray.build_app(
                run.path, replicas=replicas, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                replica_cpus=args.threads / replicas, threads=threads, name=f"bench{replicas}",
            )  # fmt: skip
            serve.run(app, name=f"bench{replicas}", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            while not Client(url).ready():
                time.sleep(0.2)
            label = f"Ray, {replicas} replica{'s' if replicas > 1 else ''} ({threads} thread(s) each)"
            rows[label] = [asyncio.run(load_test(url, jpeg, c, args.requests)) for c in args.clients]
            serve.shutdown()
    finally:
        ray.shutdown()
    print("\n| deployment | clients | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for label, table in rows.items():
        for row in table:
            cells = f"{row['req_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f}"
            print(f"| {label} | {row['clients']} | {cells} |")
    single, one = rows["single server"][-1], next(v for k, v in rows.items() if "1 replica" in k)[-1]
    ratio = one["req_per_s"] / single["req_per_s"]
    print(f"\nRay (1 replica) / single server at {single['clients']} clients: {ratio:.2f}x (goal >= 0.85x: "
          f"{'met' if ratio >= 0.85 else 'NOT met'})")  # fmt: skip
    return {"rows": rows, "ray_1_vs_single": ratio}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.ray:
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="mtp-serving-bench-") as tmp:
            root = Path(tmp)
            build(root, args.quick, export=False)
            jpeg, _ = photo(MODELS[args.quick][2])
            results = ray_comparison(args, root, jpeg)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    torch.set_num_threads(args.threads)
    name, _, size = MODELS[args.quick]
    print(
        f"{name} @ {size}px, tasks {', '.join(TASKS)} (LoRA r=8), {args.threads} thread(s); server: max batch "
        f"{args.max_batch}, max wait {args.max_wait_ms:g} ms; {args.requests} timed requests per row",
        flush=True,
    )
    results: dict[str, Any] = {"config": vars(args), "model": name, "image_size": size, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="mtp-serving-bench-") as tmp:
        root = Path(tmp)
        model, size = build(root, args.quick, "onnx" in args.backends)
        jpeg, tensor = photo(size)
        for backend in args.backends:
            print(f"\n=== {backend} backend ===", flush=True)
            proc, url = start_server(args, backend, root)
            rows = []
            try:
                for clients in args.clients:
                    before = batch_stats(url)
                    row = asyncio.run(load_test(url, jpeg, clients, args.requests))
                    after = batch_stats(url)
                    batches = max(1.0, after["batch_size_count"] - before["batch_size_count"])
                    row["mean_batch"] = (after["batch_size_sum"] - before["batch_size_sum"]) / batches
                    busy = after["batch_seconds_sum"] - before["batch_seconds_sum"]
                    images = after["batch_size_sum"] - before["batch_size_sum"]
                    # the worker's time in forward passes (incl. warm-up rounds, so approximate) and its speed then
                    row["worker_busy"] = min(1.0, busy / row["wall_s"])
                    row["forward_img_per_s"] = images / max(busy, 1e-9)
                    # offline at the batch size the server ran (the goal's comparison) and at one image per client
                    row["server_batch"] = max(1, round(row["mean_batch"]))
                    row["offline_img_per_s"] = offline(args, backend, model, root, tensor, row["server_batch"])
                    row["vs_offline"] = row["req_per_s"] / row["offline_img_per_s"]
                    same = row["server_batch"] == clients
                    row["offline_clients_img_per_s"] = (
                        row["offline_img_per_s"] if same else offline(args, backend, model, root, tensor, clients)
                    )
                    row["vs_offline_clients"] = row["req_per_s"] / row["offline_clients_img_per_s"]
                    row["tail"] = row["p99_ms"] / row["p50_ms"]
                    rows.append(row)
                    print(
                        f"  {clients:>2} clients: {row['req_per_s']:.1f} req/s (offline at the server's batch "
                        f"{row['server_batch']}: {row['offline_img_per_s']:.1f} img/s, {row['vs_offline']:.2f}x; at "
                        f"batch {clients}: {row['vs_offline_clients']:.2f}x), p50 {row['p50_ms']:.0f} ms, "
                        f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}, worker busy "
                        f"{100 * row['worker_busy']:.0f} % at {row['forward_img_per_s']:.1f} img/s",
                        flush=True,
                    )
                loads = task_loads(args, url, model, root) if backend == "torch" else None
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            results["backends"][backend] = {"rows": rows, "task_load": loads}

    print(f"\n{name} @ {size}px, {args.threads} thread(s):\n")
    print("| backend | clients | req/s | mean batch | offline img/s (same batch) | server / offline | "
          "server / offline at batch = clients | p50 ms | p99 ms | p99 / p50 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for backend, r in results["backends"].items():
        for row in r["rows"]:
            print(
                f"| {backend} | {row['clients']} | {row['req_per_s']:.1f} | {row['mean_batch']:.1f} | "
                f"{row['offline_img_per_s']:.1f} | {row['vs_offline']:.2f}x | {row['vs_offline_clients']:.2f}x | "
                f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['tail']:.2f} |"
            )
    goals = {}
    for backend, r in results["backends"].items():
        top = max(r["rows"], key=lambda row: row["clients"])
        goals[f"{backend}: throughput >= {GOAL_THROUGHPUT}x offline at {top['clients']} clients"] = bool(
            top["vs_offline"] >= GOAL_THROUGHPUT
        )
        goals[f"{backend}: p99 <= {GOAL_TAIL}x p50 at {top['clients']} clients"] = bool(top["tail"] <= GOAL_TAIL)
        if r["task_load"]:
            loads = r["task_load"]
            print(
                f"\ntask load p50: {loads['http_p50_ms']:.1f} ms through POST /v1/tasks, "
                f"{loads['in_process_p50_ms']:.1f} ms in process (read_task + attach_task)"
            )
            goals[f"task load p50 <= {GOAL_LOAD_MS:.0f} ms (admin API)"] = bool(loads["http_p50_ms"] <= GOAL_LOAD_MS)
    print()
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    load = os.getloadavg()[0]
    print(f"\n1-min load average at the end: {load:.2f} on {os.cpu_count()} CPUs (clients share the cores)")
    results["goals"] = goals
    results["load_average_end"] = load
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
