"""Bridges to other frameworks. Each lives in its own module and imports its framework only when used:

- `multitask_peft.integrations.openmmlab`: `PEFTBackbone` for MMDetection / MMSegmentation configs, and the
  hook that saves its PEFT modules as one of our tasks (needs the OpenMMLab extra, `scripts/install_openmmlab.sh`).

`require_openmmlab` (the check of that extra) lives with the OpenMMLab heads in `multitask_peft.tasks`.
"""

from __future__ import annotations

from multitask_peft.tasks.openmmlab_env import INSTALL_HINT, MMCV_RANGE, require_openmmlab

__all__ = ["INSTALL_HINT", "MMCV_RANGE", "require_openmmlab"]
