"""The README's backbone table, from the family registry the tests run over (`tests/test_families.py`).

For each model of `FAMILIES` (at its reduced size) it builds the host and reads how it is split: the timm class,
the split (family / chain / generic), where rows may branch off a shared prefix (the parts after the stem), whether
prompt tokens are offered, and the feature-map strides heads get. Mixed batches, gradients, save / load, dense
heads (segmentation and detection in input pixels) and ONNX export parity are what `tests/test_families.py`
checks for every row (`pytest tests/test_families.py -m "slow or not slow"`).

    python scripts/backbone_table.py
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_families import FAMILIES, build  # noqa: E402

from multitask_peft.tasks.necks import nominal_stride  # noqa: E402

SPLITS = {"family": "family split", "chain": "chain split (checked)", "generic": "generic (whole model)"}


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)
    print("| timm class | model tried (reduced) | split | prefix branch points | prompts | map strides |")
    print("|---|---|---|---:|:---:|---|")
    rows = []
    for name in FAMILIES:
        model, _ = build(name)
        layout = model.backbone.layout
        branch = "input only" if layout.split == "generic" else str(len(layout.parts) - 1)
        strides = ", ".join(
            str(r) if nominal_stride(r) == r else f"{r} (as {nominal_stride(r)})" for _, r in model.feature_info.levels
        )
        rows.append((type(model.backbone.model).__name__, name, SPLITS[layout.split], branch, layout.prompts, strides))
    for cls, name, split, branch, prompts, strides in sorted(rows, key=lambda r: (r[2], r[0], r[1])):
        print(f"| `{cls}` | `{name}` | {split} | {branch} | {'yes' if prompts else '-'} | {strides} |")


if __name__ == "__main__":
    main()
