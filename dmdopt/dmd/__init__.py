"""POD + DMD weight extrapolation, split as in PyDMD: snapshots/POD, operator, variant.

- `pod`: POD by the method of snapshots and the rank rule (`select_rank`).
- `operator`: exact DMD on POD coefficients (reduced operator, eigenvalues, modes).
- `extrapolate`: the affine-exact variant (DMD of the differences) and the horizon maths.

Typical use: ``fit = fit_dmd(X, rank=0.99); x = fit.predict(50)`` -- one O(p m^2) fit, then
O(p r) per horizon; or ``extrapolate(X, rank=0.99, horizon=50)`` for both at once.
"""

from __future__ import annotations

from .extrapolate import (
    GROWING_POLICIES,
    NEUTRAL_TOL,
    DMDFit,
    dmd_flops,
    extrapolate,
    fit_dmd,
    horizon_gain,
    parse_horizon,
    stabilized_gain,
)
from .operator import DMDOperator, dmd_from_gram
from .pod import POD, SnapshotPOD, parse_rank, pod, select_rank

__all__ = [
    "GROWING_POLICIES",
    "NEUTRAL_TOL",
    "POD",
    "DMDFit",
    "DMDOperator",
    "SnapshotPOD",
    "dmd_flops",
    "dmd_from_gram",
    "extrapolate",
    "fit_dmd",
    "horizon_gain",
    "parse_horizon",
    "parse_rank",
    "pod",
    "select_rank",
    "stabilized_gain",
]
