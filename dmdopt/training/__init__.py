"""Training: the loop, the DMD accelerator and cost accounting."""

from dmdopt.training.accelerator import DMDAccelerator
from dmdopt.training.config import DMDConfig, TrainConfig
from dmdopt.training.cost import CostCounter
from dmdopt.training.loop import Diverged, TrainResult, evaluate, train

__all__ = ["CostCounter", "DMDAccelerator", "DMDConfig", "Diverged", "TrainConfig",
           "TrainResult", "evaluate", "train"]
