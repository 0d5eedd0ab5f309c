"""grao: a thin GRAO trainer for Hugging Face causal LMs on top of ``grao_kernels.grao_loss``.

``grao train`` / ``grao eval`` on the command line; in Python::

    from grao import TrainConfig, Trainer
    Trainer(TrainConfig(steps=10, output_dir="runs/x")).train()
    Trainer(cfg, loss=my_loss)  # any callable LossBatch -> LossOutput (see grao.losses)
"""

from .config import ConfigError, TrainConfig
from .data import DataError, Example, load_jsonl
from .losses import GRAO, Loss, LossBatch, LossOutput
from .train.trainer import Trainer

__all__ = [
    "GRAO",
    "ConfigError",
    "DataError",
    "Example",
    "Loss",
    "LossBatch",
    "LossOutput",
    "TrainConfig",
    "Trainer",
    "load_jsonl",
]
