"""dmdopt: tune DMD-accelerated neural-network training with Optuna.

Public surface (everything else is private):
    DMDConfig, DMDAccelerator, train, TrainResult   -- training (dmdopt.training)
    load_dataset                                     -- the problem's data (dmdopt.problem)
    load_study_file, run_study, recommend, load_tuned_config -- studies and tuned configs
    dmdopt.dmd.extrapolate                           -- one (p x m) snapshot matrix
    UserError -- what reading a user's file raises (bad file, field or value); the
                 constructors of the config classes raise ValueError for a bad value
Imports are lazy so `import dmdopt` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DMDConfig": "dmdopt.training.config",
    "TrainConfig": "dmdopt.training.config",
    "DMDAccelerator": "dmdopt.training.accelerator",
    "train": "dmdopt.training.loop",
    "TrainResult": "dmdopt.training.loop",
    "ModelConfig": "dmdopt.model",
    "ProblemConfig": "dmdopt.problem.config",
    "load_dataset": "dmdopt.problem.dataset",
    "load_study_file": "dmdopt.search.config",
    "run_study": "dmdopt.search.study",
    "recommend": "dmdopt.search.recommend",
    "load_tuned_config": "dmdopt.export",
    "UserError": "dmdopt.errors",
}

__all__ = [
    "DMDAccelerator", "DMDConfig", "ModelConfig", "ProblemConfig", "TrainConfig", "TrainResult",
    "UserError", "load_dataset", "load_study_file", "load_tuned_config", "recommend", "run_study", "train",
]

if TYPE_CHECKING:  # pragma: no cover
    from dmdopt.errors import UserError
    from dmdopt.export import load_tuned_config
    from dmdopt.model import ModelConfig
    from dmdopt.problem.config import ProblemConfig
    from dmdopt.problem.dataset import load_dataset
    from dmdopt.search.config import load_study_file
    from dmdopt.search.recommend import recommend
    from dmdopt.search.study import run_study
    from dmdopt.training.accelerator import DMDAccelerator
    from dmdopt.training.config import DMDConfig, TrainConfig
    from dmdopt.training.loop import TrainResult, train


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dmdopt' has no attribute {name!r}")
