"""`mtpeft data ...`: dataset generators."""

from __future__ import annotations

import argparse
import sys

from .multifashion import MultiFashionConfig, generate_multifashion


def _counts(values: list[int], name: str) -> tuple[int, int, int]:
    """One count N (train N, val and test N // 4) or three counts (train, val, test)."""
    if len(values) == 1:
        return values[0], values[0] // 4, values[0] // 4
    if len(values) == 3:
        return tuple(values)  # type: ignore[return-value]
    raise ValueError(f"--{name} takes one count (train; val and test get a quarter) or three, got {values}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `mtpeft data`; `argv` excludes the `data` word."""
    parser = argparse.ArgumentParser(prog="mtpeft data", description="Build datasets offline.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    mf = sub.add_parser(
        "multifashion",
        help="classification crops, detection (COCO) and segmentation scenes from Fashion-MNIST on real photos",
        description="Build MultiFashion from the Debian package dataset-fashion-mnist and scikit-image's photos.",
    )
    defaults = MultiFashionConfig()
    mf.add_argument("out", help="output folder")
    mf.add_argument("--num-scenes", type=int, nargs="+", default=list(defaults.num_scenes), metavar="N",
                    help="scenes: TRAIN [VAL TEST] (default: %(default)s)")  # fmt: skip
    mf.add_argument("--num-crops", type=int, nargs="+", default=list(defaults.num_crops), metavar="N",
                    help="classification images: TRAIN [VAL TEST] (default: %(default)s)")  # fmt: skip
    mf.add_argument("--image-size", type=int, default=defaults.image_size, help="scene side (default: %(default)s)")
    mf.add_argument("--crop-size", type=int, default=defaults.crop_size, help="crop side (default: %(default)s)")
    mf.add_argument("--max-objects", type=int, default=defaults.max_objects, help="garments per scene, at most")
    mf.add_argument("--seed", type=int, default=defaults.seed)
    mf.add_argument("--format", choices=("jpg", "png"), default=defaults.image_format, help="scene image format")
    mf.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    mf.add_argument("--fashion-mnist-dir", default=None, help="folder with the four Fashion-MNIST *-ubyte.gz files")
    mf.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    mf.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = MultiFashionConfig(
            num_scenes=_counts(args.num_scenes, "num-scenes"),
            num_crops=_counts(args.num_crops, "num-crops"),
            image_size=args.image_size,
            crop_size=args.crop_size,
            max_objects=args.max_objects,
            seed=args.seed,
            image_format=args.format,
            workers=args.workers,
            fashion_mnist_dir=args.fashion_mnist_dir,
        )
        meta = generate_multifashion(args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"mtpeft data: error: {e}", file=sys.stderr)
        sys.exit(2)
    counts = ", ".join(f"{split} {v['crops']} crops / {v['scenes']} scenes" for split, v in meta["splits"].items())
    print(f"wrote MultiFashion to {args.out}: {counts}")
