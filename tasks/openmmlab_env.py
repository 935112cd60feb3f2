"""Whether the OpenMMLab extra (mmcv with its compiled ops, mmengine, mmdet, mmseg) is usable here.

The OpenMMLab heads of `multitask_peft.tasks` (`openmmlab.py`) check it before building an mmdet / mmseg module;
`multitask_peft.integrations` re-exports `require_openmmlab` for the OpenMMLab bridge (`PEFTBackbone`).
"""

from __future__ import annotations

import importlib

MMCV_RANGE = ("2.0.0", "2.2.0")  # what mmdet 3.3 and mmseg 1.2 accept
INSTALL_HINT = "run scripts/install_openmmlab.sh from the multitask-peft repository (README: OpenMMLab)"


def require_openmmlab() -> None:
    """Raise an ImportError that says what to do unless mmcv with its compiled ops, mmdet and mmseg import.

    mmcv's ops are a C++ extension compiled against one torch: after a torch upgrade they stop loading, and the
    message names both versions (`install_openmmlab.sh` keeps a wheel per torch version).
    """
    import torch
    from packaging.version import Version

    try:
        mmcv = importlib.import_module("mmcv")
    except ImportError as e:
        raise ImportError(f"the OpenMMLab extra is not installed (no mmcv: {e}); {INSTALL_HINT}") from e
    version = Version(mmcv.__version__)
    if not Version(MMCV_RANGE[0]) <= version < Version(MMCV_RANGE[1]):
        raise ImportError(
            f"mmcv {mmcv.__version__} is installed; mmdet 3.3 / mmseg 1.2 need {MMCV_RANGE[0]} <= mmcv < "
            f"{MMCV_RANGE[1]}; {INSTALL_HINT}"
        )
    try:
        built = importlib.import_module("mmcv._mtpeft_build").TORCH_VERSION
    except ImportError:
        built = None  # an mmcv from elsewhere
    try:
        importlib.import_module("mmcv._ext")
    except ImportError as e:
        if built is not None and built != torch.__version__:
            raise ImportError(
                f"mmcv's ops were compiled for torch {built} but torch {torch.__version__} is installed; "
                f"{INSTALL_HINT} again (it builds and caches a wheel for this torch)"
            ) from e
        raise ImportError(f"mmcv is installed without loadable compiled ops ({e}); {INSTALL_HINT}") from e
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"mmcv's ops were compiled for torch {built} but torch {torch.__version__} is installed (they load, "
            f"but an ABI change would crash at run time); {INSTALL_HINT} again"
        )
    for name in ("mmengine", "mmdet", "mmseg"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{name} does not import ({e}); {INSTALL_HINT}") from e
