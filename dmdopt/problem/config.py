"""Configuration of the surrogate-modelling problem (what data gets generated).

Default parameter box and why:

* ``source_x``, ``source_y`` in [0.3, 0.7]: keeps the source (width 0.1) well
  inside the square so the plume is not mostly cut off by the boundary.
* ``wind_x``, ``wind_y`` in [-1, 1]: every wind direction, speed up to √2;
  the far-field boundary condition makes the field continuous across zero.
* ``diffusivity`` in [0.01, 0.1], log-uniform: spans a decade of plume
  widths (domain Péclet ≈ 10-140). The lower bound keeps plumes a few cells
  wide on a 64² grid and smooth enough for an MLP to fit to a few-% relative
  L2 error. At the box's fast, thin corner (|v| = √2, D = 0.01) the upwind
  scheme's numerical diffusion |v|h/2 ≈ 0.011 equals D, so there the 64²
  field is itself some % from the continuum one; the surrogate learns the
  discrete map, which is what it is scored on. Log-uniform because D acts
  multiplicatively.
* ``decay`` in [0.1, 1.0]: decay lengths sqrt(D/k) from 0.1 to 1, i.e. from
  a compact plume to one filling the domain; k > 0 also keeps the problem
  well posed at zero wind.
* ``source_width`` 0.1 (= 6 cells at 64²): resolved, so fields are smooth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

__all__ = ["LOG_PARAMS", "PARAM_NAMES", "ProblemConfig"]

#: Input parameters of the surrogate, in column order of ``Dataset.params``.
PARAM_NAMES: tuple[str, ...] = (
    "source_x",
    "source_y",
    "wind_x",
    "wind_y",
    "diffusivity",
    "decay",
)
#: Parameters sampled log-uniformly (the rest are uniform).
LOG_PARAMS: frozenset[str] = frozenset({"diffusivity"})

#: Bump when the solver's discretisation changes, so stale caches are not reused.
SOLVER_VERSION = 1


def _as_range(name: str, value: Any) -> tuple[float, float]:
    # a list or tuple of two real numbers: a string "01" would iterate as ("0", "1")
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, Real) for v in value)):
        raise ValueError(f"problem.{name} must be a (low, high) pair of numbers, got {value!r}")
    lo, hi = (float(v) + 0.0 for v in value)  # + 0.0: -0.0 is 0.0, one cache key
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"problem.{name} must be a finite (low, high) with low <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True, kw_only=True)
class ProblemConfig:
    """Everything that determines a generated dataset (and hence its cache key)."""

    grid: int = 64
    n_samples: int = 2048
    seed: int = 0
    source_x: tuple[float, float] = (0.3, 0.7)
    source_y: tuple[float, float] = (0.3, 0.7)
    wind_x: tuple[float, float] = (-1.0, 1.0)
    wind_y: tuple[float, float] = (-1.0, 1.0)
    diffusivity: tuple[float, float] = (0.01, 0.1)
    decay: tuple[float, float] = (0.1, 1.0)
    source_width: float = 0.1
    source_strength: float = 1.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("grid", "n_samples", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise ValueError(f"problem.{name} must be an int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.grid < 4:
            raise ValueError(f"problem.grid must be >= 4, got {self.grid!r}")
        if self.n_samples < 1:
            raise ValueError(f"problem.n_samples must be >= 1, got {self.n_samples!r}")
        if self.seed < 0:
            raise ValueError(f"problem.seed must be >= 0, got {self.seed!r}")
        for name in PARAM_NAMES:
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        if self.diffusivity[0] <= 0:
            raise ValueError(f"problem.diffusivity range must be > 0, got {self.diffusivity!r}")
        if self.decay[0] < 0:
            raise ValueError(f"problem.decay range must be >= 0, got {self.decay!r}")
        for name in ("source_width", "source_strength", "val_fraction", "test_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                raise ValueError(f"problem.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v) + 0.0)
        for name in ("source_width", "source_strength"):
            if getattr(self, name) <= 0:
                raise ValueError(f"problem.{name} must be > 0, got {getattr(self, name)!r}")
        # A source centre far off the unit square puts (almost) nothing on it: all-zero fields,
        # whose relative errors training then reported as a divergence. Within 3 widths of
        # the square at least exp(-4.5), about 1% of the source's peak, falls on it.
        margin = 3.0 * self.source_width
        for name in ("source_x", "source_y"):
            lo, hi = getattr(self, name)
            if lo < -margin or hi > 1.0 + margin:
                raise ValueError(
                    f"problem.{name} must lie within 3 source widths of the unit square, "
                    f"[{-margin:g}, {1 + margin:g}] for source_width {self.source_width:g}; got "
                    f"{list(getattr(self, name))!r}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"problem.{name} must be in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"problem.val_fraction + problem.test_fraction must be < 1, got "
                f"{self.val_fraction!r} + {self.test_fraction!r}"
            )
        # training fits on train, the learning curve needs val and the metrics test: none may
        # be empty
        sizes = self.split_sizes()
        for split, fraction in (("val", "val_fraction"), ("test", "test_fraction"), ("train", None)):
            if sizes[split] < 1:
                how = (f"round({self.n_samples} x {getattr(self, fraction)!r}) = 0 samples"
                       if fraction else "no samples left")
                raise ValueError(
                    f"problem.n_samples = {self.n_samples} leaves the {split} split empty "
                    f"({how}); raise problem.n_samples"
                    + (f" or problem.{fraction}" if fraction else ""))

    def split_sizes(self) -> dict[str, int]:
        """Samples per split: test and val are rounded fractions of `n_samples`, train the rest.
        `sampling.split_indices` cuts its permutation at these sizes."""
        n_test = round(self.n_samples * self.test_fraction)
        n_val = round(self.n_samples * self.val_fraction)
        return {"test": n_test, "val": n_val, "train": self.n_samples - n_test - n_val}

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Parameter ranges keyed by name, in :data:`PARAM_NAMES` order."""
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (ranges as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProblemConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown problem keys: {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # defensive: should be caught by __post_init__
            raise ValueError(f"bad problem values: {exc}") from None

    def config_hash(self) -> str:
        """First 16 hex chars of sha256 over canonical JSON of all fields + solver version."""
        payload = {"config": self.to_dict(), "solver_version": SOLVER_VERSION}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
