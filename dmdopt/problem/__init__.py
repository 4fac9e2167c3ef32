"""The physical problem: a steady pollutant-plume PDE and its surrogate dataset.

``solve_field`` maps 6 parameters (:data:`PARAM_NAMES`) to a ``grid × grid``
concentration field; ``load_dataset`` samples a :class:`ProblemConfig`'s
parameter box, solves every sample and caches the result.
"""

from __future__ import annotations

from dmdopt.problem.config import PARAM_NAMES, ProblemConfig
from dmdopt.problem.dataset import Dataset, load_dataset
from dmdopt.problem.solver import solve_field

__all__ = ["PARAM_NAMES", "Dataset", "ProblemConfig", "load_dataset", "solve_field"]
