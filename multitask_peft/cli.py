"""`mtpeft`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys


def _methods(args: argparse.Namespace) -> None:
    from .peft import METHODS

    for name in METHODS.names():
        cls = METHODS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:13s} {'/'.join(cls.kinds):8s} {'foldable' if cls.foldable else '        '}  {doc}")


def _info(args: argparse.Namespace) -> None:
    from .task_io import read_task_config

    print(json.dumps(read_task_config(args.task_dir), indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtpeft", description="Parameter-efficient multi-task vision.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered PEFT methods").set_defaults(fn=_methods)
    info = sub.add_parser("info", help="show a saved task's config")
    info.add_argument("task_dir")
    info.set_defaults(fn=_info)
    demo = sub.add_parser("demo", help="train, evaluate, save and reload three Fashion-MNIST tasks", add_help=False)
    demo.set_defaults(fn=None)
    data = sub.add_parser("data", help="build datasets offline (`mtpeft data multifashion OUT`)", add_help=False)
    data.set_defaults(fn=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return
    if args.command == "data":
        from .tasks.data.cli import main as data_main

        data_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.fn(args)
    except ValueError as e:
        print(f"mtpeft: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
