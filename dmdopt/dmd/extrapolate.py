"""The affine-exact DMD variant and the horizon extrapolation.

Gradient descent near a minimum is affine, x_{k+1} = A x_k + b, not linear, so plain DMD on
the snapshots cannot represent it.  The differences d_k = x_{k+1} - x_k remove b:
d_{k+1} = A d_k.  We therefore fit DMD to D0 = [d_0 .. d_{m-3}], D1 = [d_1 .. d_{m-2}] and
extrapolate by summing the differences,

    x_{m-1+h} = x_{m-1} + sum_{j=1..h} A^j d_{m-2}
              ~ x_{m-1} + U W diag(g_h(lambda)) W^-1 U^T d_{m-2},
    g_h(lambda) = lambda (1 - lambda^h) / (1 - lambda),   g_inf(lambda) = lambda / (1 - lambda).

This is exact (up to rounding) whenever the snapshots span the Krylov space of the dynamics,
i.e. m >= dim + 3 for dynamics living in a `dim`-dimensional (affine) subspace.

Eigenvalue policy (``tol`` = `NEUTRAL_TOL` by default):
  * decaying, |lambda| < 1: summed exactly for a finite horizon (`horizon_gain` is stable
    as lambda -> 1); for horizon=inf summed to the limit when |lambda| < 1 - tol, and not
    extrapolated when 1 - tol <= |lambda| < 1 (a gain above 1 / tol: indistinguishable from
    a mode that never converges). Until 2026-12-08 the band below 1 was projected onto the
    circle for finite horizons too: a mode at lambda = 1 - 5e-7 then moved h steps instead of
    sum lambda^j, 2.5e-4 off at h = 1000 (affine dynamics, so not exact).
  * neutral, 1 <= |lambda| <= 1 + tol: for a finite horizon projected onto the unit
    circle (lambda / |lambda|), i.e. bounded oscillation or constant drift h * amplitude; for
    horizon=inf not extrapolated (it never converges).
  * growing, |lambda| > 1 + tol: dropped for every horizon (``growing="drop"``, the
    default) -- the mode "stays" at x_{m-1}. A projected growing mode still drifts linearly,
    h * its last step, which for a horizon of 1000 is the blow-up a caller without a line
    search must avoid. ``growing="drift"`` projects growing modes onto the unit circle for a
    finite horizon (never for inf): each continues at its current step length, never faster.
    Gradient descent at its largest stable learning rate has its slow drift in such modes
    (the loss decrease accelerates within a window); the accelerator's line search picks how
    far to follow them (see `dmdopt.training.accelerator` for the measurement).
So every kept eigenvalue has |lambda| <= 1, |g_h| <= min(h, 2 / |1 - lambda|) and, with
b = W^-1 U^T d_{m-2} (unit-norm columns of W),

    ||x_pred - x_{m-1}||_2 <= ||U||_2 * sum_j |g_h(lambda_j)| |b_j| <= ||U||_2 * h * ||b||_1,

where ||U||_2 ~ 1; `DMDFit.displacement_bound` evaluates the middle expression.

The rank rule sees the differences, not the states: a mode's share of the differences is its
amplitude times |lambda - 1|, while its share of the extrapolation is that times |g_h(lambda)|
(up to h, or 1 / |1 - lambda| for inf). An energy fraction therefore cuts the slowest modes,
lambda near 1, first -- the ones that carry a long jump. Left so on purpose: weighting by
|g_h| would amplify exactly the modes whose eigenvalues are least certain, and the line search
already bounds what a jump costs; give an integer cap where the slow modes are wanted.

Non-integer horizons use the principal branch lambda^h = exp(h Log lambda); the result is the
real part, a smooth interpolation between steps (exact for real positive eigenvalues).

Failure policy: non-finite snapshots, a non-finite or failed DMD, all-zero differences and
m < 3 make the fit trivial and `predict` returns a copy of the last snapshot -- the
extrapolation never introduces NaN or inf.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .operator import DMDOperator, dmd_from_gram
from .pod import (
    column_gram,
    combine_columns,
    combine_differences,
    difference_gram,
    exact_precision,
    parse_rank,
)

__all__ = [
    "GROWING_POLICIES",
    "NEUTRAL_TOL",
    "DMDFit",
    "dmd_flops",
    "extrapolate",
    "fit_dmd",
    "horizon_gain",
    "parse_horizon",
    "stabilized_gain",
]

NEUTRAL_TOL = 1e-6
"""Width of the bands around |lambda| = 1 treated as neutral (see module docstring): up to
1 + tol for every horizon (projected onto the circle), down to 1 - tol for horizon=inf only.

With horizon=inf the largest amplification of a kept mode is 1 / NEUTRAL_TOL = 1e6 step
lengths; eigenvalues closer to 1 than that are numerically indistinguishable from a mode that
never converges.
"""
_GRAM_LIMIT = 2**30
"""Bytes of the (m - 1)^2 float64 Gram above which a window with more snapshots than
coordinates is taken for a transposed (m x p) matrix: a real window is 5-100 snapshots."""

GROWING_POLICIES = ("drop", "drift")
"""What `predict` does with growing modes (|lambda| > 1 + tol); see the module docstring."""


# --------------------------------------------------------------------------- horizon maths


def parse_horizon(horizon: int | float | str) -> float:
    """A positive number of steps as float; math.inf, float('inf') and 'inf' mean converged."""
    if isinstance(horizon, str):
        if horizon.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
    elif isinstance(horizon, numbers.Real) and not isinstance(horizon, bool):
        value = float(horizon)
        if value > 0.0:  # NaN fails this too
            return value
    raise ValueError(
        f"horizon must be a positive number of steps or 'inf'; got horizon={horizon!r}"
    )


def _expm1_complex(re: Tensor, im: Tensor) -> Tensor:
    """exp(re + i im) - 1 without cancellation near 0 (torch has no complex expm1)."""
    real = torch.expm1(re) * torch.cos(im) - 2.0 * torch.sin(0.5 * im) ** 2
    imag = torch.exp(re) * torch.sin(im)
    return torch.complex(real, imag)


def horizon_gain(eigenvalues: Tensor, horizon: float) -> Tensor:
    """g_h(lambda) = sum_{j=1..h} lambda^j = lambda (1 - lambda^h) / (1 - lambda), stably.

    Written as lambda * expm1(h mu) / expm1(mu) with mu = Log lambda, which stays accurate as
    lambda -> 1 (where it tends to h) and gives 0 at lambda = 0.  horizon=inf gives
    lambda / (1 - lambda) (meaningful for |lambda| < 1 only).  No stabilisation here.
    """
    lam = eigenvalues.to(torch.complex128)
    if math.isinf(horizon):
        return lam / (1.0 - lam)
    log_mod = torch.log(lam.abs())  # -inf at 0: expm1 -> -1 and the ratio -> 1, so g(0) = 0
    arg = torch.angle(lam)
    ratio = _expm1_complex(horizon * log_mod, horizon * arg) / _expm1_complex(log_mod, arg)
    ratio = torch.where(lam == 1.0, torch.full_like(lam, horizon), ratio)
    return lam * ratio


def _check_growing(growing: str) -> None:
    if growing not in GROWING_POLICIES:
        raise ValueError(f"growing must be one of {GROWING_POLICIES}; got growing={growing!r}")


def _check_tol(tol: float) -> None:
    # tol >= 1 would keep no decaying mode for horizon=inf (|lambda| < 1 - tol never
    # holds), NaN would make every mode growing
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1); got tol={tol!r}")


def stabilized_gain(eigenvalues: Tensor, horizon: float, tol: float = NEUTRAL_TOL,
                    growing: str = "drop") -> Tensor:
    """g_h with the eigenvalue policy: neutral on the circle (inf: dropped); growing dropped,
    or with ``growing="drift"`` and a finite horizon projected onto the circle like neutral."""
    _check_growing(growing)
    _check_tol(tol)
    lam = eigenvalues.to(torch.complex128)
    mod = lam.abs()
    if math.isinf(horizon):
        keep = mod < 1.0 - tol
        gain = horizon_gain(torch.where(keep, lam, torch.zeros_like(lam)), horizon)
    else:
        keep = mod <= 1.0 + tol if growing == "drop" else torch.ones_like(mod, dtype=torch.bool)
        neutral = mod > 1.0  # onto the circle; a decaying mode is summed as it is
        lam = torch.where(neutral, lam / torch.where(neutral, mod, 1.0), lam)
        gain = horizon_gain(lam, horizon)
    return torch.where(keep, gain, torch.zeros_like(gain))


# --------------------------------------------------------------------------- fit + predict


@dataclass(frozen=True, eq=False)
class DMDFit:
    """One affine-exact DMD fit of a snapshot window; `predict` evaluates any horizon in O(p r).

    status: 'ok', or why the fit is trivial and `predict` returns the last snapshot:
    'too_few_snapshots' (m < 3), 'non_finite' (non-finite snapshots or DMD numbers),
    'converged' (all differences zero), 'failed' (the eigensolver raised).
    """

    last: Tensor  # x_{m-1}, (p,), the snapshots' dtype and device (a copy)
    status: str
    operator: DMDOperator | None = None
    basis: Tensor | None = None  # U, (p, r): float32/float64 as the snapshots (half -> float32)
    amplitudes: Tensor | None = None  # b = W^-1 U^T d_{m-2}, (r,) complex128
    basis_norm: float = 0.0  # ||U||_2 (1 in exact arithmetic)
    gram_passes: int = 1  # p-sized Gram products formed (2: redone in float64, `pod.rows_gram`)

    @property
    def rank(self) -> int:
        return 0 if self.operator is None else self.operator.rank

    @property
    def eigenvalues(self) -> Tensor:
        """DMD eigenvalues of the difference dynamics, (r,) complex128 on the CPU."""
        if self.operator is None:
            return torch.zeros(0, dtype=torch.complex128)
        return self.operator.eigenvalues

    @property
    @exact_precision
    def modes(self) -> Tensor:
        """Projected DMD modes U W, (p, r) complex, on the snapshots' device (allocated here)."""
        if self.operator is None or self.basis is None:
            return torch.zeros(
                self.last.shape[0], 0, dtype=torch.complex128, device=self.last.device
            )
        return self.operator.projected_modes(self.basis)

    def _coefficients(self, horizon: float, tol: float, growing: str) -> Tensor | None:
        """Real r-vector c with x_pred = x_{m-1} + U c, or None when nothing is extrapolated."""
        if self.operator is None or self.amplitudes is None:
            return None
        gain = stabilized_gain(self.operator.eigenvalues, horizon, tol, growing)
        if not bool((gain != 0).any()):
            return None
        coeff = (self.operator.eigenvectors @ (gain * self.amplitudes)).real
        return coeff if bool(torch.isfinite(coeff).all()) else None

    @torch.no_grad()
    @exact_precision
    def displacement(self, horizon: int | float | str, *, tol: float = NEUTRAL_TOL,
                     growing: str = "drop") -> Tensor | None:
        """predict(horizon) - x_{m-1}, (p,) in the basis' precision, or None when nothing is
        extrapolated (or it is not finite).

        Why: a caller holding the state in a finer dtype than the snapshots (float32 weights,
        bfloat16 snapshots) adds this to its own copy, so only the move is rounded, not the
        state (predict starts from the rounded last snapshot)."""
        coeff = self._coefficients(parse_horizon(horizon), tol, growing)
        if coeff is None or self.basis is None:
            return None
        out = self.basis @ coeff.to(self.basis.device, self.basis.dtype)
        return out if bool(torch.isfinite(out).all()) else None

    @torch.no_grad()
    def predict(self, horizon: int | float | str, *, tol: float = NEUTRAL_TOL,
                growing: str = "drop") -> Tensor:
        """The state `horizon` steps after the last snapshot, (p,), the snapshots' dtype/device."""
        move = self.displacement(horizon, tol=tol, growing=growing)
        if move is None:
            return self.last.clone()
        out = (self.last.to(move.dtype) + move).to(self.last.dtype)
        if not bool(torch.isfinite(out).all()):  # after the cast: float16 overflows at 65504
            return self.last.clone()
        return out

    def displacement_bound(self, horizon: int | float | str, *, tol: float = NEUTRAL_TOL,
                           growing: str = "drop") -> float:
        """||U||_2 * sum_j |g_h(lambda_j)| |b_j|: a guaranteed cap on ||predict(h) - x_{m-1}||."""
        if self.operator is None or self.amplitudes is None:
            return 0.0
        gain = stabilized_gain(self.operator.eigenvalues, parse_horizon(horizon), tol, growing)
        return self.basis_norm * float((gain.abs() * self.amplitudes.abs()).sum())


def _check_snapshots(snapshots: Tensor) -> None:
    if not isinstance(snapshots, Tensor) or snapshots.ndim != 2 or snapshots.shape[1] < 1:
        shape = (
            tuple(snapshots.shape) if isinstance(snapshots, Tensor) else type(snapshots).__name__
        )
        raise ValueError(f"snapshots must be a 2-D (p x m) tensor with m >= 1; got {shape}")
    if not snapshots.dtype.is_floating_point:
        raise TypeError(f"snapshots must be real floating point; got dtype {snapshots.dtype}")
    m = snapshots.shape[1]
    if m > snapshots.shape[0] and (m - 1) ** 2 * 8 > _GRAM_LIMIT:  # (m x p) given by mistake
        raise ValueError(f"snapshots must be (p x m), one snapshot per column; got shape "
                         f"{tuple(snapshots.shape)}: {m} snapshots would need a "
                         f"{(m - 1) ** 2 * 8 / 2**30:.0f} GiB Gram matrix (pass snapshots.T?)")


@torch.no_grad()
@exact_precision
def fit_dmd(snapshots: Tensor, *, rank: int | float | str) -> DMDFit:
    """Fit the affine-exact DMD to snapshots (p x m, columns in time order).

    Cost O(p m^2) (Gram of the differences) + O(p m r) (basis U). Extra device memory: U
    (p x r) plus one block of differences at a time (`pod._difference_blocks`, 32 MiB for
    float32/half snapshots; a float64 row block of `pod.CHUNK_ELEMENTS` for float64 ones).
    """
    _check_snapshots(snapshots)
    parse_rank(rank)
    p, m = snapshots.shape
    last = snapshots[:, -1].clone()
    if m < 3:
        return DMDFit(last, "too_few_snapshots")
    # float32/half snapshots: float32 products over blocks of their differences, never all
    # of them at once (pod._difference_blocks); float64 keeps the all-float64 path.
    single = snapshots.dtype != torch.float64
    passes = 1
    if single:
        gram, passes = difference_gram(snapshots, rank, n_pod=m - 2)
    else:
        gram = column_gram(snapshots, differences=True)  # (m-1) x (m-1), D = [d_0 .. d_{m-2}]

    def trivial(status: str) -> DMDFit:  # nothing to extrapolate, but the Gram was paid for
        return DMDFit(last, status, gram_passes=passes)

    if not bool(torch.isfinite(gram).all()):
        return trivial("non_finite")
    try:
        op = dmd_from_gram(gram, rank, n_rows=p)
    except torch.linalg.LinAlgError:
        return trivial("failed")
    if op is None:
        return trivial("converged")
    n = m - 2
    z = op.reduce(gram[:n, n])  # U^T d_{m-2}
    try:
        amplitudes = torch.linalg.solve(op.eigenvectors, z.to(torch.complex128))
    except torch.linalg.LinAlgError:
        return trivial("failed")
    small = (op.reduced, op.eigenvalues, op.eigenvectors, amplitudes)
    if not all(bool(torch.isfinite(t).all()) for t in small):
        return trivial("non_finite")
    coeff = op.pod.coefficients
    basis_gram = coeff.T @ gram[:n, :n] @ coeff  # U^T U
    basis_norm = (
        float(torch.linalg.eigvalsh(0.5 * (basis_gram + basis_gram.T)).max().clamp(min=0)) ** 0.5
    )
    work = snapshots.dtype if snapshots.dtype in (torch.float32, torch.float64) else torch.float32
    if single:
        basis = combine_differences(snapshots, coeff, work)
    else:
        basis = combine_columns(snapshots, coeff, differences=True, out_dtype=work)
    return DMDFit(last, "ok", op, basis, amplitudes, basis_norm, passes)


def extrapolate(
    snapshots: Tensor,
    *,
    rank: int | float | str,
    horizon: int | float | str,
    tol: float = NEUTRAL_TOL,
    growing: str = "drop",
) -> Tensor:
    """x_{m-1+horizon} (shape (p,)) from the snapshots (p x m) by affine-exact DMD.

    `fit_dmd(snapshots, rank=rank).predict(horizon)`; the horizon, the growing-mode policy and
    `tol` are validated first so a bad value fails before the O(p m^2) work.
    """
    h = parse_horizon(horizon)
    _check_growing(growing)
    _check_tol(tol)
    return fit_dmd(snapshots, rank=rank).predict(h, tol=tol, growing=growing)


def dmd_flops(p: int, m: int, r: int, *, gram_passes: int = 1) -> int:
    """Analytic FLOP count of one `fit_dmd` + one `predict` (p rows, m snapshots, rank r).

    Deterministic so training can charge DMD cost without timing it.  Terms: differences
    p(m-1); Gram 2 p (m-1)^2 per pass (`DMDFit.gram_passes`: 2 when the float32 Gram was
    redone in float64); basis U = D0 V Sigma^-1, 2 p n r (n = m-2); predict 2 p r + p;
    small: eigh ~9 n^3, A~ 2 n^2 r + 2 n r^2, U^T d 2 n r, U^T U 2 n^2 r + 2 n r^2 + 9 r^3,
    eig ~25 r^3, complex solve ~(8/3) r^3 * 4, complex W g b 8 r^2.  U^T D1 needs no p-sized
    product here: it is a block of the Gram.
    """
    for name, value in (("p", p), ("m", m), ("r", r), ("gram_passes", gram_passes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {name}={value!r}")
    p, m, r = int(p), int(m), int(r)
    if m < 3:
        return 0
    n1, n = m - 1, m - 2
    r = min(r, n)
    big = p * n1 + 2 * p * n1 * n1 * max(int(gram_passes), 1)
    if r == 0:
        return big + 9 * n**3
    big += 2 * p * n * r + 2 * p * r + p
    small = 9 * n**3 + 2 * (2 * n * n * r + 2 * n * r * r) + 2 * n * r + 9 * r**3
    small += 25 * r**3 + (32 * r**3) // 3 + 8 * r * r
    return big + small
