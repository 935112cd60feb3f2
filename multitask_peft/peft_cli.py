"""`mtpeft import-peft` and `mtpeft export-peft`: HF PEFT adapters of timm models to task folders and back."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .task_io import CONFIG_NAME, WEIGHTS_NAME, read_task_config

if TYPE_CHECKING:
    from .model import MultiTaskModel


def add_peft_commands(sub: argparse._SubParsersAction) -> None:
    """Add the two commands to `mtpeft`'s subcommand parsers."""
    imp = sub.add_parser(
        "import-peft",
        help="convert an HF PEFT LoRA / DoRA adapter of a timm model (save_pretrained) into a task folder",
        description="Read PEFT_DIR (adapter_config.json + adapter_model.safetensors, as save_pretrained writes them "
        "for peft.get_peft_model(timm_model, LoraConfig(...))) and write the task folder OUT (task_config.json + "
        "task_weights.safetensors; RUN/tasks/NAME serves it with the run). The backbone must be the one the "
        "adapter was trained on. Head: --head-classes N makes a new linear classification head; without it, the "
        "adapter must hold timm's classifier (modules_to_save), which becomes the head.",
    )
    imp.add_argument("peft_dir")
    imp.add_argument("out", help="task folder to write")
    _add_backbone_options(imp)
    imp.add_argument("--name", help="task name (default: OUT's folder name)")
    imp.add_argument("--head-classes", type=int, metavar="N", help="a new linear classification head of N classes")
    imp.set_defaults(fn=_import_peft)
    exp = sub.add_parser(
        "export-peft",
        help="write a LoRA / DoRA task as an HF PEFT adapter (for PeftModel.from_pretrained on the timm model)",
        description="Write task TASK of the run directory SOURCE (or the task folder SOURCE, whose backbone is "
        "given by --run or --backbone / --pretrained / --img-size) as OUT/adapter_config.json + "
        "adapter_model.safetensors. A linear classification head goes along as timm's classifier "
        "(modules_to_save); other heads are left out, with a note. Tasks using methods other than lora / dora are "
        "refused.",
    )
    exp.add_argument("source", help="run directory, or task folder")
    exp.add_argument("out", help="folder for the PEFT adapter files")
    exp.add_argument("--task", help="with a run directory: the task (default: its only task)")
    _add_backbone_options(exp)
    exp.set_defaults(fn=_export_peft)


def _import_peft(args: argparse.Namespace) -> None:
    """`mtpeft import-peft PEFT_DIR OUT`: an HF PEFT LoRA / DoRA adapter of a timm model as a task folder."""
    from .tasks import Classification

    model = _backbone_model(args, default_arch=None)
    head = Classification(num_classes=args.head_classes) if args.head_classes is not None else None
    task = model.load_task(args.peft_dir, name=args.name or Path(args.out).name, head=head)
    model.save_task(task.name, args.out)
    methods = [f"{m.config.method} r={m.config.r} on {len(m.adapters())} modules" for m in task.peft.values()]
    print(f"task {task.name!r}: {', '.join(methods)}; {task.head_config.head_type} head; {model.backbone.fingerprint}")
    print(f"wrote {Path(args.out) / CONFIG_NAME} + {WEIGHTS_NAME}")


def _export_peft(args: argparse.Namespace) -> None:
    """`mtpeft export-peft SOURCE OUT`: a LoRA / DoRA task of a run (or a task folder) as an HF PEFT adapter."""
    from .rundir import CONFIG_FILE, RunDirectory

    source = Path(args.source)
    if (source / CONFIG_FILE).is_file():
        if args.run or args.backbone or args.pretrained or args.img_size:
            raise ValueError(f"{source} is a run directory, whose backbone is used: leave out the backbone options")
        model = RunDirectory(source).load_model()
        if args.task is None and len(model.tasks) != 1:
            raise ValueError(f"{source} has tasks {model.tasks}: name one with --task")
        name = args.task or model.tasks[0]
    else:
        if args.task is not None:
            raise ValueError(f"--task names a task of a run directory; {source} is a task folder (of one task)")
        model = _backbone_model(args, default_arch=read_task_config(source)["backbone"].get("arch"))
        name = model.load_task(source).name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_task(name, args.out, format="peft")
    for warning in caught:
        print(f"mtpeft export-peft: note: {warning.message}", file=sys.stderr)
    classes = "" if caught else f", num_classes={model.task(name).head_config.num_classes}"
    print(
        f"wrote {Path(args.out) / PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (task {name!r}): load it with "
        f"PeftModel.from_pretrained on timm.create_model({model.backbone.arch!r}{classes}) with the backbone's weights"
    )


def _backbone_model(args: argparse.Namespace, default_arch: str | None) -> MultiTaskModel:
    """The model of `--run RUN` (its backbone), or of `--backbone NAME` (default: `default_arch`) with
    `--pretrained` weights and `--img-size`."""
    import torch

    from .model import MultiTaskModel
    from .rundir import RunDirectory

    if args.run:
        if args.backbone or args.pretrained or args.img_size:
            raise ValueError("--run uses that run's backbone: leave out --backbone, --pretrained and --img-size")
        return RunDirectory(args.run).build_backbone()
    arch = args.backbone or default_arch
    if not arch:
        raise ValueError("name the backbone the adapter was trained on: --run RUN_DIR, or --backbone TIMM_NAME")
    pretrained = True if args.pretrained == "timm" else args.pretrained or False
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    torch.manual_seed(0)  # (random weights, without --pretrained: the same in every call)
    return MultiTaskModel.from_timm(arch, pretrained=pretrained, **kwargs)


def _add_backbone_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="RUN_DIR", help="use the backbone of this run directory")
    parser.add_argument("--backbone", metavar="TIMM_NAME", help="or this timm model")
    parser.add_argument(
        "--pretrained",
        metavar="WEIGHTS",
        help="with --backbone: a weight file, a named source, or 'timm' (timm's pretrained weights); default: "
        "random weights drawn with seed 0",
    )
    parser.add_argument("--img-size", type=int, help="with --backbone: timm's img_size (ViTs)")
