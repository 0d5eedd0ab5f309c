"""grao: a thin GRAO trainer for Hugging Face causal LMs on top of ``grao_kernels.grao_loss``.

``grao train`` / ``grao eval`` on the command line; in Python::

    from grao import TrainConfig, Trainer
    Trainer(TrainConfig(steps=10, output_dir="runs/x")).train()
"""

from .config import ConfigError, TrainConfig
from .data import DataError, Example, load_jsonl
from .trainer import Trainer

__all__ = ["ConfigError", "DataError", "Example", "TrainConfig", "Trainer", "load_jsonl"]
