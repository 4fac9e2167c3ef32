"""Optuna study engine: study files, search space, objective, storage, summaries."""

from dmdopt.search.config import StudyConfig, load_study_file, parse_study
from dmdopt.search.study import run_study

__all__ = ["StudyConfig", "load_study_file", "parse_study", "run_study"]
