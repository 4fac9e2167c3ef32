"""Optuna study engine: study files, search space, objective, storage, summaries."""

import warnings

import optuna

# dmdopt relies on Optuna features still flagged experimental (heartbeats, retry callback,
# metric names); their warnings would drown the CLI's output on every command.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

from dmdopt.search.config import StudyConfig, load_study_file, parse_study  # noqa: E402
from dmdopt.search.study import run_study  # noqa: E402

__all__ = ["StudyConfig", "load_study_file", "parse_study", "run_study"]
