"""Configs for a training run: the optimiser/budget (`TrainConfig`) and DMD (`DMDConfig`).

Both are frozen, keyword-only and validated on construction, so a bad value fails where it is
written (a TOML file, a tuned config, a trial) with the field's name in the message.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

OPTIMIZERS = ("adam", "sgd")
GROUPINGS = ("layer", "tensor", "global")
OPTIMIZER_STATE_POLICIES = ("keep", "reset")
SNAPSHOT_DTYPES = ("float32", "float64", "bfloat16", "float16")
SNAPSHOT_DEVICES = ("same", "cpu")
GROWING_CHOICES = ("auto", "drop", "drift")  # dmdopt.dmd.GROWING_POLICIES, plus 'auto' (per optimiser)
# TrainConfig fields stored as float, so `lr = 1` and `lr = 1.0` are one setting (one hash);
# `TunedConfig.legacy_settings_hashes` re-spells them as ints for the names of before
TRAIN_FLOAT_FIELDS = ("lr", "momentum", "target_error")


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (numpy's come from sweeps and arrays)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _to_python(config: Any) -> None:
    """Store numpy numbers as Python ones, so a config serialises (TOML, JSON) and hashes as
    the same config written by hand."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            object.__setattr__(config, f.name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):
            object.__setattr__(config, f.name, float(value))


def _from_dict(cls, data: dict, section: str):
    if not isinstance(data, dict):
        raise ValueError(f"{section}: expected a table, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key {unknown[0]!r}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The base optimiser and the budget.

    `max_steps` is the budget in backprop steps; `target_error` (validation relative L2) stops
    earlier when reached. `batch_size=None` means full batch, as does any size at or above
    the training rows (as torch's DataLoader, one batch). `eval_every` sets the learning
    curve's resolution; monitoring evaluations are *not* counted as training cost.

    `accept_rows`: how many training rows DMD's accept test (the line search's forward passes)
    evaluates: a fixed random subset, drawn once from `seed`; None = the whole training set.
    With mini-batches the whole set costs n_train / batch_size batch forwards per candidate,
    more than a jump saves; a subset the size of a batch makes DMD pay (measured in
    `benchmarks/probe_minibatch.py`). At or above the training rows: the whole set. Ignored
    without DMD (`train --accept-rows` without DMD flags is refused).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    batch_size: int | None = None
    accept_rows: int | None = None
    max_steps: int = 2000
    target_error: float | None = None
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _to_python(self)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"training.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not _is_number(self.lr) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"training.lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"training.momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":  # it would be silently unused
            raise ValueError(f"training.momentum = {self.momentum!r} applies to optimizer 'sgd' "
                             f"only, not {self.optimizer!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"training.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.accept_rows is not None and (not _is_int(self.accept_rows) or self.accept_rows < 1):
            raise ValueError(f"training.accept_rows must be a positive integer, got {self.accept_rows!r}")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ValueError(f"training.max_steps must be a positive integer, got {self.max_steps!r}")
        if self.target_error is not None and (
            not _is_number(self.target_error) or not 0 < self.target_error < math.inf
        ):
            raise ValueError(f"training.target_error must be a finite number > 0, got {self.target_error!r}")
        if not _is_int(self.eval_every) or self.eval_every < 1:
            raise ValueError(f"training.eval_every must be a positive integer, got {self.eval_every!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:  # torch and numpy both take it
            raise ValueError(f"training.seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.device == "mps":  # Apple GPUs: no float64, which the POD and the metrics use
            raise ValueError("training.device = 'mps' is not supported (MPS has no float64, "
                             "which the POD's small matrices and the metrics use): use cpu")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"training.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        # one spelling per value, so that equal settings hash (name a checkpoint) alike: lr = 1
        # in a hand-written TOML is the 1.0 an export writes, and momentum -0.0 is 0.0
        for name in TRAIN_FLOAT_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)) + 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return _from_dict(cls, data, "training")


def parse_horizon(value: Any) -> float:
    """`inf` (float or the string) or a positive finite number."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    if not _is_number(value) or not (value > 0):
        raise ValueError(f"dmd.horizon must be a positive number or 'inf', got {value!r}")
    try:
        return float(value)
    except OverflowError:  # a Python int past float's range (a TOML integer cannot be)
        raise ValueError(f"dmd.horizon must be a positive number or 'inf', got an integer of "
                         f"{len(str(value))} digits, past the float range") from None


@dataclass(frozen=True, kw_only=True)
class DMDConfig:
    """Settings of the DMD accelerator (see `DMDAccelerator`).

    window     backprop steps (snapshots) between two DMD jumps.
    rank       POD rank: int cap, energy fraction in (0, 1], or 0 = optimal hard threshold;
               applied to the snapshot differences, so a fraction drops slow modes first
               (`dmdopt.dmd.extrapolate`'s module docstring says why).
    horizon    steps to extrapolate ahead, or inf (approximate converged state).
    line_search  horizon factors tried with forward passes only, smallest step first, stopping
               once the loss rises after an improvement, or at its second rise in a row before
               any; the best loss wins. () means only
               `horizon` itself. For horizon=inf a factor f < 1 is the damped step toward the
               converged state and factors > 1 are skipped. Default: a geometric ladder 5..20480 steps (see
               `dmdopt.training.accelerator` for the measurements behind the defaults).
    grouping   'layer' (weights+bias of a module together), 'tensor', or 'global'.
    growing    DMD modes with |lambda| > 1: 'drop' (never extrapolated), 'drift' (continued
               at their current step length, finite horizons only; see `dmdopt.dmd.extrapolate`)
               or 'auto': 'drift' under plain SGD (with or without momentum), 'drop' under any
               other optimiser (Adam & co.), as measured in `dmdopt.training.accelerator`.
    optimizer_state  'keep' (moments survive a kept jump) or 'reset' (cleared).
    snapshot_dtype / snapshot_device  where snapshots live (memory: window*params*bytes, plus a
               jump's peak: README, "Memory"). Half dtypes round steps below ~1/256 (bf16) of a weight to 0.
    warmup     plain backprop steps before the first window (early training is not affine).
    """

    window: int = 20
    rank: int | float = 0.99
    horizon: float = 20.0
    line_search: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)
    grouping: str = "layer"
    growing: str = "auto"
    optimizer_state: str = "keep"
    snapshot_dtype: str = "float32"
    snapshot_device: str = "same"
    warmup: int = 0

    def __post_init__(self) -> None:
        _to_python(self)
        if not _is_int(self.window) or self.window < 3:
            raise ValueError(f"dmd.window must be an integer >= 3, got {self.window!r}")
        rank = self.rank
        if _is_int(rank):
            if rank < 0:
                raise ValueError(f"dmd.rank must be >= 0, got {rank!r}")
            if rank > self.window - 2:  # m snapshots: m - 1 differences, m - 2 DMD pairs
                raise ValueError(
                    f"dmd.rank must be at most window - 2 = {self.window - 2} (the DMD modes a "
                    f"window supports), got {rank!r}"
                )
        elif _is_number(rank) and rank == 0:  # 0.0 as `dmdopt.dmd` reads it: the optimal threshold
            object.__setattr__(self, "rank", 0)
        elif _is_number(rank):
            if not 0 < rank <= 1:
                raise ValueError(f"dmd.rank as an energy fraction must be in (0, 1], got {rank!r}")
        else:
            raise ValueError(f"dmd.rank must be an integer or a fraction in (0, 1], got {rank!r}")
        object.__setattr__(self, "horizon", parse_horizon(self.horizon))
        if isinstance(self.line_search, (str, bytes)) or not hasattr(self.line_search, "__iter__"):
            raise ValueError(f"dmd.line_search must be a list of horizon factors, got {self.line_search!r}")
        factors = tuple(self.line_search)
        if any(not _is_number(f) or not 0 < f < math.inf for f in factors):
            raise ValueError(
                f"dmd.line_search factors must be finite positive numbers, got {self.line_search!r}")
        object.__setattr__(self, "line_search", tuple(float(f) for f in factors))
        if self.grouping not in GROUPINGS:
            raise ValueError(f"dmd.grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.growing not in GROWING_CHOICES:
            raise ValueError(f"dmd.growing must be one of {GROWING_CHOICES}, got {self.growing!r}")
        if self.optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(
                f"dmd.optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {self.optimizer_state!r}"
            )
        if self.snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"dmd.snapshot_dtype must be one of {SNAPSHOT_DTYPES}, got {self.snapshot_dtype!r}")
        if self.snapshot_device not in SNAPSHOT_DEVICES:
            raise ValueError(
                f"dmd.snapshot_device must be one of {SNAPSHOT_DEVICES}, got {self.snapshot_device!r}"
            )
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"dmd.warmup must be a non-negative integer, got {self.warmup!r}")

    @property
    def first_jump_step(self) -> int:
        """Backprop steps before the first jump can be tried: a run shorter than this never
        runs DMD, which the CLI, production and study files refuse rather than train plain."""
        return self.warmup + self.window

    def to_dict(self) -> dict:
        data = asdict(self)
        data["horizon"] = "inf" if math.isinf(self.horizon) else self.horizon
        data["line_search"] = list(self.line_search)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DMDConfig:
        data = dict(data)
        if "line_search" in data and isinstance(data["line_search"], list):
            data["line_search"] = tuple(data["line_search"])
        return _from_dict(cls, data, "dmd")
