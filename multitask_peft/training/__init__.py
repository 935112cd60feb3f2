"""Joint multi-task training: `Trainer(model, {task: TaskData(dataset)}, TrainConfig(...), out_dir).fit()`."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint
from .config import TaskData, TrainConfig
from .distributed import DistContext
from .distributed import setup as setup_distributed
from .logs import read_log
from .memory import saved_activations
from .sampling import TaskStream, sample_tasks, task_probabilities
from .schedule import WarmupCosine, no_weight_decay, param_groups
from .trainer import NonFiniteLossError, Trainer
from .weighting import LossWeighting

__all__ = [
    "DistContext",
    "LossWeighting",
    "NonFiniteLossError",
    "TaskData",
    "TaskStream",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "latest_checkpoint",
    "list_checkpoints",
    "load_trainer_state",
    "no_weight_decay",
    "param_groups",
    "read_log",
    "sample_tasks",
    "saved_activations",
    "save_checkpoint",
    "setup_distributed",
    "task_probabilities",
]
