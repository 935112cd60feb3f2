"""`mtpeft`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .peft_cli import add_peft_commands


def _methods(args: argparse.Namespace) -> None:
    from .peft import METHODS

    for name in METHODS.names():
        cls = METHODS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:13s} {'/'.join(cls.kinds):8s} {'foldable' if cls.foldable else '        '}  {doc}")


def _info(args: argparse.Namespace) -> None:
    from .task_io import read_task_config

    print(json.dumps(read_task_config(args.task_dir), indent=2))


def _train(args: argparse.Namespace) -> None:
    from .run import format_report, load_run_config, train_run

    out = train_run(load_run_config(args.config, args.set), resume=args.resume)
    print(format_report(json.loads((out / "report.json").read_text())))
    onnx = ", model.onnx + model.json" if (out / "model.onnx").is_file() else ""
    files = f"tasks/, report.md, report.html, figures/, report.json, log.jsonl, checkpoints/{onnx}"
    print(f"run directory: {out} ({files})")


def _sweep(args: argparse.Namespace) -> None:
    import yaml

    from .run_config import read_config_dict
    from .sweep import SWEEP_FILE, expand_sweep, format_results, run_sweep

    raw = read_config_dict(args.config, args.set)
    config, members, spec = expand_sweep(raw)
    print(f"sweep: {len(members)} configurations of {len({m.task for m in members})} task(s), trained together")
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    path = run_sweep(config, members, spec, resume=args.resume)
    if path is not None:
        print(format_results(json.loads((path / "sweep.json").read_text())))
        print(f"sweep directory: {path} (sweep.md, sweep.json, figures/, tasks/, config.yaml: the expanded run)")


def _eval(args: argparse.Namespace) -> None:
    from .report import read_report
    from .run import evaluate_run, format_report, write_report
    from .rundir import RunDirectory

    if args.wise is not None:
        _eval_wise(args)
        return
    if args.wise_tasks is not None or args.wise_reference is not None:
        raise ValueError("--wise-tasks and --wise-reference need `--wise ALPHAS` (e.g. --wise 0:1:0.1)")
    if args.shift is not None:
        _eval_shift(args)
        return
    given = [flag for flag, value in _shift_options(args).items() if value is not None]
    if given:
        one = len(given) == 1
        raise ValueError(
            f"{', '.join(given)} need{'s' if one else ''} `--shift corruptions` or `--wise`: add it, or leave "
            f"{'it' if one else 'them'} out"
        )
    run = RunDirectory(args.run_dir)
    model = run.load_model()
    report = evaluate_run(model, run.config, run.path)
    previous = read_report(run.path) or {}
    for key in ("train_time_s", "diverged"):  # evaluating again does not change how training went
        if key in previous:
            report[key] = previous[key]
    write_report(report, run.path, model, run.config)
    print(format_report(report))
    print(f"refreshed {run.path}/report.md, report.html, report.json and figures/")


def _shift_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "--corruptions": args.corruptions,
        "--severities": args.severities,
        "--max-images": args.max_images,
        "--seed": args.seed,
    }


def _eval_shift(args: argparse.Namespace) -> None:
    """`mtpeft eval RUN --shift corruptions`: every task clean and under the corruption suite."""
    from .robustness import SHIFTS, evaluate_robustness, format_summary, write_robustness
    from .rundir import RunDirectory
    from .tasks.data import SEVERITIES, check_corruption_names, check_severities

    if args.shift not in SHIFTS:
        raise ValueError(f"--shift must be one of {', '.join(SHIFTS)} but the value passed is {args.shift!r}")
    corruptions = None
    if args.corruptions is not None:
        corruptions = check_corruption_names(_split(args.corruptions, "--corruptions", str))
    severities = SEVERITIES
    if args.severities is not None:
        severities = check_severities(_split(args.severities, "--severities", int))
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images should be a positive integer but the value passed is {args.max_images}")
    run = RunDirectory(args.run_dir)
    model = run.load_model()
    seed = 0 if args.seed is None else args.seed
    report = evaluate_robustness(model, run.config, corruptions, severities, args.max_images, seed)
    written = write_robustness(report, run.path)
    print(format_summary(report))
    print(f"wrote {', '.join(str(p) for p in written)}")


def _eval_wise(args: argparse.Namespace) -> None:
    """`mtpeft eval RUN --wise ALPHAS`: each task's metric against alpha, clean and under corruptions."""
    from .rundir import RunDirectory
    from .tasks.data import check_corruption_names, check_severities
    from .wise import DEFAULT_SEVERITIES, evaluate_wise, format_wise, parse_alphas, write_wise

    if args.shift not in (None, "corruptions"):
        raise ValueError(f"--shift with --wise must be 'corruptions' but the value passed is {args.shift!r}")
    alphas = parse_alphas(args.wise)
    corruptions = None
    if args.corruptions is not None:
        corruptions = (
            [] if args.corruptions == "none" else check_corruption_names(_split(args.corruptions, "--corruptions", str))
        )
    severities = DEFAULT_SEVERITIES
    if args.severities is not None:
        severities = check_severities(_split(args.severities, "--severities", int))
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images should be a positive integer but the value passed is {args.max_images}")
    tasks = _split(args.wise_tasks, "--wise-tasks", str) if args.wise_tasks is not None else None
    run = RunDirectory(args.run_dir)
    model = run.load_model()
    seed = 0 if args.seed is None else args.seed
    report = evaluate_wise(
        model, run.config, alphas, tasks, args.wise_reference, corruptions, severities, args.max_images, seed
    )
    written = write_wise(report, run.path)
    print(format_wise(report))
    print(f"wrote {', '.join(str(p) for p in written)}")


def _split(text: str, flag: str, kind: type) -> list:
    """A comma-separated option as a list of `kind` values; a ValueError quotes what does not parse."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag} expects a comma-separated list but the value passed is {text!r}")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated {kind.__name__}s but the value passed is {text!r}") from None


def _tasks(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .run import format_report
    from .rundir import RunDirectory

    report = Path(args.run_dir) / "report.json"
    if report.is_file():
        print(format_report(json.loads(report.read_text())))
        return
    model = RunDirectory(args.run_dir).load_model()
    for name in model.tasks:
        print(name, model.num_parameters(name))


def _export(args: argparse.Namespace) -> None:
    import tempfile

    from .export.triton import check_repo_target, write_triton_repo
    from .run import export_run
    from .rundir import RunDirectory

    if args.out is None and args.triton_repo is None:
        raise ValueError("give the output .onnx file (mtpeft export RUN OUT.onnx), or --triton-repo DIR, or both")
    run = RunDirectory(args.run_dir)
    triton_model = args.triton_model or (Path(args.out).stem if args.out else run.path.resolve().name)
    if args.triton_repo is not None:  # before the export: bad names and existing models fail fast
        check_repo_target(Path(args.triton_repo), triton_model, args.triton_max_batch, args.force)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    options = {"merge": args.merge, "dynamic_batch": not args.static_batch, "opset": args.opset, "fp16": args.fp16}
    options.update(optimize=not args.no_optimize, check=not args.no_check, quantize="int8" if args.int8 else None)
    with tempfile.TemporaryDirectory(prefix="mtpeft-export-") as tmp:
        out = args.out if args.out is not None else Path(tmp) / f"{triton_model}.onnx"
        path = export_run(run.load_model(), run.config, out, tasks, args.image_size, **options)
        if args.out is not None:
            print(f"sidecar: {path.with_suffix('.json')}")
        if args.triton_repo is not None:
            model_dir = write_triton_repo(path, args.triton_repo, triton_model, args.triton_max_batch, args.force)
            print(f"triton model: {model_dir} (tritonserver --model-repository {args.triton_repo})")


def _serve(args: argparse.Namespace) -> None:
    import logging
    import os

    try:
        from .serving import serve
    except ImportError as e:
        raise ValueError(f"serving needs the `serve` extra: pip install 'multitask-peft[serve]' ({e})") from e
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.admin_token or os.environ.get("MTPEFT_ADMIN_TOKEN") or None
    if args.ray:
        _serve_ray(args, token)
        return
    if args.replicas is not None or args.autoscale or args.address:
        raise ValueError("--replicas, --autoscale and --address need --ray")
    serve(
        args.dir,
        backend=args.backend,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_resident=args.max_resident,
        timeout_s=args.timeout,
        drain_timeout_s=args.drain_timeout,
        admin_token=token,
        device=args.device,
        grpc_port=args.grpc_port,
    )


def _serve_ray(args: argparse.Namespace, token: str | None) -> None:
    """`mtpeft serve DIR --ray`: the run's tasks on Ray Serve replicas (`serving/ray.py`)."""
    if args.backend != "torch" or args.grpc_port is not None:
        raise ValueError("--ray serves the torch backend over HTTP (leave out --backend onnx / --grpc-port)")
    autoscale = None
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit() or not 0 <= int(low) <= int(high) or int(high) < 1:
            raise ValueError(f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), got {args.autoscale!r}")
        autoscale = (int(low), int(high))
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    try:
        from .serving import ray as serving_ray
    except ImportError as e:
        raise ValueError(f"--ray needs the `ray` extra: pip install 'multitask-peft[ray]' ({e})") from e
    serving_ray.run(
        args.dir,
        address=args.address,
        host=args.host,
        port=args.port,
        replicas=args.replicas or 1,
        autoscale=autoscale,
        max_resident=args.max_resident,
        admin_token=token,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        device=args.device,
    )


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .serving.predict import (
        IMAGE_EXTENSIONS,
        RESULTS_FILE,
        find_images,
        load_predictor,
        predict_files,
        select_tasks,
    )

    out = Path(args.out)
    images, missing = find_images(args.images, exclude=out)
    for item, reason in missing:
        print(f"mtpeft predict: skipped {item}: {reason}", file=sys.stderr)
    if not images:
        print(
            f"mtpeft predict: no image files in {' '.join(args.images)} ({' '.join(IMAGE_EXTENSIONS)})", file=sys.stderr
        )
        sys.exit(1)
    predictor = load_predictor(args.source, onnx=args.onnx, device=args.device)
    tasks = select_tasks(predictor, args.tasks)
    for name in tasks:
        own = predictor.tasks[name].score_threshold
        if args.score_threshold is not None and own is not None and args.score_threshold < own:
            print(
                f"mtpeft predict: note: task {name!r} already drops detections scoring under its head's "
                f"score_thresh {own}; --score-threshold {args.score_threshold} keeps no more than that",
                file=sys.stderr,
            )
    summary = predict_files(
        predictor, images, out, tasks, args.score_threshold, args.batch_size, draw=not args.no_pictures
    )
    skipped = summary.skipped + len(missing)
    pictures = ", pictures" if not args.no_pictures else ""
    print(
        f"predicted {summary.done} image(s) with {', '.join(tasks)} on {predictor.source}, {skipped} skipped; "
        f"{out / RESULTS_FILE}{pictures} in {out}"
    )
    if not summary.done:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtpeft", description="Parameter-efficient multi-task vision.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered PEFT methods").set_defaults(fn=_methods)
    info = sub.add_parser("info", help="show a saved task's config")
    info.add_argument("task_dir")
    info.set_defaults(fn=_info)
    data = sub.add_parser("data", help="build datasets offline (`mtpeft data multifashion OUT`)", add_help=False)
    data.set_defaults(fn=None)
    train = sub.add_parser("train", help="train the tasks of a YAML run config jointly, evaluate, report")
    train.add_argument("config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.set_defaults(fn=_train)
    sweep = sub.add_parser(
        "sweep",
        help="train every configuration of a sweep config (lists of candidates) in one run; choose on held-out data",
    )
    sweep.add_argument("config")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sweep.add_argument("--resume", action="store_true", help="continue from the sweep's latest checkpoint")
    sweep.set_defaults(fn=_sweep)
    evaluate = sub.add_parser(
        "eval", help="evaluate the tasks of a finished run on their eval splits; refresh its report and figures"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--shift",
        metavar="KIND",
        help="evaluate under distribution shift instead: 'corruptions' (ImageNet-C-style suite; writes "
        "robustness.json, robustness.md and figures/robustness.png; the report is left as it is)",
    )
    evaluate.add_argument("--corruptions", help="with --shift corruptions: comma-separated names (default: all)")
    evaluate.add_argument(
        "--severities", help="with --shift corruptions: comma-separated, in 1..5 (default: 1,2,3,4,5)"
    )
    evaluate.add_argument(
        "--max-images", type=int, help="with --shift corruptions: at most N images per task, spread over its split"
    )
    evaluate.add_argument("--seed", type=int, help="with --shift corruptions: corruption seed (default 0)")
    evaluate.add_argument(
        "--wise",
        metavar="ALPHAS",
        help="the WiSE curve instead: alphas as start:stop:step (0:1:0.1) or a list (0,0.5,1); each task's metric "
        "clean and under corruptions (default: all at severity 3; --corruptions none skips them); writes wise.md, "
        "wise.json, figures/wise.png",
    )
    evaluate.add_argument("--wise-tasks", help="with --wise: comma-separated tasks (default: all with a WiSE form)")
    evaluate.add_argument(
        "--wise-reference", metavar="TASK", help="with --wise: the linear-probe task alpha = 0 becomes (default: zeros)"
    )
    evaluate.set_defaults(fn=_eval)
    tasks = sub.add_parser("tasks", help="list a run's tasks: metric, trainable parameters, PPT")
    tasks.add_argument("run_dir")
    tasks.set_defaults(fn=_tasks)
    export = sub.add_parser("export", help="export a run's tasks to ONNX (one multi-task graph, or merged)")
    export.add_argument("run_dir")
    export.add_argument("out", nargs="?", help="output .onnx file (the JSON sidecar goes next to it)")
    export.add_argument("--tasks", help="comma-separated tasks (default: every task with an ONNX form)")
    export.add_argument(
        "--merge",
        action="store_true",
        help="one task folded into the weights; several LoRA tasks: one graph + an .onnx_adapter file per task",
    )
    export.add_argument("--image-size", type=int, help="input side (default: the largest task image size)")
    export.add_argument("--opset", type=int)
    export.add_argument("--fp16", action="store_true", help="half-precision graph (float32 inputs / outputs)")
    export.add_argument(
        "--int8", action="store_true", help="dynamic int8 weight matmuls (CPU; ~2x on ViTs; results drift, see docs)"
    )
    export.add_argument("--static-batch", action="store_true", help="batch fixed to 1 instead of dynamic")
    export.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimiser (faster)")
    export.add_argument("--no-check", action="store_true", help="skip onnx.checker and the parity run")
    export.add_argument(
        "--triton-repo", metavar="DIR", help="also write the graph into a Triton model repository: DIR/<model>/"
    )
    export.add_argument(
        "--triton-model", metavar="NAME", help="the Triton model's name (default: OUT's name, else the run's folder)"
    )
    export.add_argument(
        "--triton-max-batch", type=int, default=32, help="Triton's max_batch_size for a dynamic batch (default: 32)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing DIR/<model> folder")
    export.set_defaults(fn=_export)
    add_peft_commands(sub)
    srv = sub.add_parser("serve", help="serve a run's tasks over HTTP (batched across requests)")
    srv.add_argument("dir", help="run directory (config.yaml + tasks/; model.onnx for --backend onnx)")
    srv.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=32, help="most images per forward pass")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    srv.add_argument("--max-queue", type=int, default=256, help="most images waiting (429 past it)")
    srv.add_argument("--max-resident", type=int, help="most tasks in the model at once (LRU; torch backend)")
    srv.add_argument("--timeout", type=float, default=30.0, help="default request timeout in seconds (504)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    srv.add_argument("--admin-token", help="enables POST/DELETE /v1/tasks (or set MTPEFT_ADMIN_TOKEN)")
    srv.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    srv.add_argument("--grpc-port", type=int, help="also serve OIP v2 over gRPC on this port (e.g. 8001; `grpc` extra)")
    srv.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas (`ray` extra)")
    srv.add_argument("--replicas", type=int, help="--ray: number of replicas (default 1)")
    srv.add_argument("--autoscale", metavar="MIN:MAX", help="--ray: autoscale between MIN and MAX replicas")
    srv.add_argument("--address", help="--ray: the Ray cluster (auto, ray://host:10001; default: a local one)")
    srv.set_defaults(fn=_serve)
    pred = sub.add_parser(
        "predict",
        help="run a run's tasks on image files and folders: results.jsonl and a picture per image",
        description="Run the tasks of a run directory (PyTorch), of its model.onnx (--onnx) or of an exported .onnx "
        "graph on image files and folders (searched recursively). Images are decoded as the server does (EXIF "
        "orientation applied) and resized to the model's input; results come back in each image's own pixels. "
        "Writes OUT/results.jsonl (one JSON line per image), OUT/<stem>.png (the results drawn on the image) and "
        "OUT/masks/<stem>.<task>.png (segmentation class ids). Unreadable images are reported and skipped; the exit "
        "status is 1 when no image could be processed.",
    )
    pred.add_argument("source", help="run directory (config.yaml + tasks/), or an exported .onnx graph")
    pred.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders")
    pred.add_argument("--tasks", help="comma-separated tasks (default: every task of SOURCE)")
    pred.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    pred.add_argument(
        "--score-threshold",
        type=float,
        help="drop detections scoring under it (default: the head's own threshold, which the model applies)",
    )
    pred.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    pred.add_argument("--device", help="torch device (default: cuda if available, else cpu); cpu keeps ONNX on CPU")
    pred.add_argument("--onnx", action="store_true", help="run the run directory's model.onnx on ONNX Runtime")
    pred.add_argument("--no-pictures", action="store_true", help="write results.jsonl and masks only")
    pred.set_defaults(fn=_predict)
    args, rest = parser.parse_known_args(argv)
    if args.command == "data":
        from .tasks.data.cli import main as data_main

        data_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mtpeft: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
