"""Space-filling parameter design and the train/val/test partition.

Design: the first ``n`` points of a scrambled Sobol' sequence in [0, 1)^6
mapped to the configured ranges (log-uniform for :data:`LOG_PARAMS`). Sobol'
covers the box far more evenly than i.i.d. sampling, which matters with only
~2k training fields; it is exactly balanced when ``n`` is a power of two (the
default 2048 = 2^11) and still low-discrepancy for any other ``n``. We draw
``2^ceil(log2 n)`` points and keep the prefix, which is what ``Sobol.random(n)``
would return, without its balance warning.

The sampling and the split permutation use independent child streams of one
``SeedSequence(seed)``, so both are reproducible and do not interfere.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.stats import qmc

from dmdopt.problem.config import LOG_PARAMS, PARAM_NAMES, ProblemConfig

__all__ = ["SPLIT_NAMES", "sample_params", "split_indices"]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    design, split = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(design), np.random.default_rng(split)


def sample_params(config: ProblemConfig) -> npt.NDArray[np.float64]:
    """Parameter design, shape ``(n_samples, 6)``, columns in :data:`PARAM_NAMES` order."""
    n = config.n_samples
    sobol = qmc.Sobol(d=len(PARAM_NAMES), scramble=True, rng=_streams(config.seed)[0])
    unit = sobol.random_base2(max(0, math.ceil(math.log2(n))))[:n]
    out = np.empty_like(unit)
    for col, name in enumerate(PARAM_NAMES):
        lo, hi = getattr(config, name)
        if name in LOG_PARAMS:
            out[:, col] = np.exp(np.log(lo) + unit[:, col] * (np.log(hi) - np.log(lo)))
        else:
            out[:, col] = lo + unit[:, col] * (hi - lo)
        # exp/log round-off must not step outside the configured range.
        np.clip(out[:, col], lo, hi, out=out[:, col])
    return out


def split_indices(config: ProblemConfig) -> dict[str, npt.NDArray[np.int64]]:
    """Disjoint, covering, sorted index arrays for train/val/test from a seeded permutation."""
    perm = _streams(config.seed)[1].permutation(config.n_samples)
    sizes = config.split_sizes()
    n_test, n_val = sizes["test"], sizes["val"]
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    return {name: np.sort(parts[name]).astype(np.int64) for name in SPLIT_NAMES}
