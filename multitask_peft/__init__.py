"""multitask-peft: parameter-efficient multi-task vision on one frozen timm backbone."""

from . import peft, tasks  # (tasks registers the heads)
from .export import export_onnx
from .heads import FeatureInfo, Features, HeadConfig
from .model import MultiTaskModel, Task
from .onnx_runner import OnnxRunner
from .ppt import ppt
from .version import __version__

__all__ = [
    "Features",
    "FeatureInfo",
    "HeadConfig",
    "MultiTaskModel",
    "OnnxRunner",
    "Task",
    "export_onnx",
    "peft",
    "ppt",
    "tasks",
    "__version__",
]


def __getattr__(name: str) -> object:
    # `mtp.serving` on first use: it needs the `serve` extra, and the core never imports it
    if name == "serving":
        import importlib

        return importlib.import_module(".serving", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
