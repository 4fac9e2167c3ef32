"""POD by the method of snapshots, and the rank rule.

The snapshot matrices of one layer are tall and skinny (p up to 1e7 rows, n ~ 5..50 columns),
so the POD never touches a p x p object: it eigendecomposes the n x n Gram matrix
G = D^T D (``G = V diag(sigma^2) V^T``) and forms the modes as U = D V Sigma^-1.

Memory: float64 data has its Gram accumulated over row blocks, one ``CHUNK_ELEMENTS`` block
(64 MiB, plus its column differences) of extra memory at a time. The DMD's differences of
float32 and half snapshots are formed and multiplied in float32 blocks of
``DIFFERENCE_BLOCK_ELEMENTS`` (32 MiB; `difference_gram`, `combine_differences`). `pod` of
float32/half data takes `_rows_single`: one float32 array of the data's shape. Never a float64
copy of the whole matrix (8 bytes per element, e.g. 4 GB for p = 1e7, m = 50).

Precision: the method of snapshots squares the condition number, so singular values below
about ``sigma_max * sqrt(n * eps64)`` (~1e-7 relative) are rounding noise; `pod` clips the rank
there (see `gram_rtol`). float32 snapshots get a float32 Gram product (fast, see
`_rows_single`), which resolves only ``sigma_max * sqrt(n * eps32)`` (~1e-3); when the rank rule
keeps a direction below that, the Gram is formed again in float64 (`rows_gram`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "EPS64",
    "POD",
    "SnapshotPOD",
    "column_gram",
    "combine_columns",
    "gram_rtol",
    "hard_threshold_omega",
    "parse_rank",
    "pod",
    "pod_from_gram",
    "rows_gram",
    "select_rank",
]

EPS64 = float(torch.finfo(torch.float64).eps)
EPS32 = float(torch.finfo(torch.float32).eps)
CHUNK_ELEMENTS = 1 << 23
"""Numbers per float64 row block (64 MiB): the only extra memory the big products need."""

_RANK_STRINGS = ("optimal", "full")

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_enabled(device: str) -> bool:
    """`torch.is_autocast_enabled(device)`, which torch < 2.4 (pyproject allows 2.2) lacks:
    there only the CPU and CUDA flags exist, as functions of no argument."""
    try:
        return bool(torch.is_autocast_enabled(device))
    except TypeError:
        legacy = {"cpu": torch.is_autocast_cpu_enabled, "cuda": torch.is_autocast_enabled}
        return bool(legacy[device]()) if device in legacy else False


def exact_precision(fn):
    """Run `fn` outside any autocast region the caller opened.

    Why: a training loop that calls `DMDAccelerator.step` (or these functions) inside
    `torch.autocast` would have the Gram and the basis products run in bfloat16/float16:
    measured, a float32 `extrapolate` under bf16 autocast was off by 3.9e-3 against a true
    move of 3.7e-5, and the accelerator kept no jump at all. Like an optimiser's update, the
    maths runs in the snapshots' own precision; the caller's closure keeps its autocast."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                if _autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------- rank rule


def hard_threshold_omega(beta: float) -> float:
    """Gavish & Donoho (2014) omega(beta) for unknown noise: tau = omega * median(sigma)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def _bad_rank(rank: object) -> ValueError:
    return ValueError(
        "rank must be an int >= 1 (cap), a float in (0, 1] (energy fraction), 0 or 'optimal' "
        f"(Gavish-Donoho hard threshold) or 'full' (numerical rank); got rank={rank!r}"
    )


def parse_rank(rank: object) -> tuple[str, float]:
    """Classify `rank` as ('cap', r) / ('energy', f) / ('optimal', 0) / ('full', 0).

    Raises ValueError naming `rank` for anything else, so callers can validate a setting
    before they have data.
    """
    if isinstance(rank, bool | torch.Tensor) or rank is None:
        # bool is an int subclass; a tensor would silently broadcast -- refuse both.
        raise _bad_rank(rank)
    if isinstance(rank, str):
        key = rank.strip().lower()
        if key in _RANK_STRINGS:
            return key, 0.0
        raise _bad_rank(rank)
    if isinstance(rank, numbers.Integral):  # python int and every numpy integer
        value = int(rank)
        if value < 0:
            raise _bad_rank(rank)
        return ("optimal", 0.0) if value == 0 else ("cap", float(value))
    if isinstance(rank, numbers.Real):  # python float and numpy floats
        value = float(rank)
        if math.isnan(value) or value < 0.0 or value > 1.0:
            raise _bad_rank(rank)
        return ("optimal", 0.0) if value == 0.0 else ("energy", value)
    raise _bad_rank(rank)


def select_rank(
    singular_values: Tensor,
    rank: int | float | str,
    *,
    n_rows: int | None = None,
    n_cols: int | None = None,
    rtol: float | None = None,
) -> int:
    """The truncation rank the rule `rank` picks for a matrix with these singular values.

    rank: int >= 1 caps the rank; float in (0, 1] keeps the smallest r whose energy
    sum(sigma_i^2, i<r) / sum(sigma^2) reaches the fraction; 0 (or 'optimal') is the
    Gavish-Donoho optimal hard threshold for unknown noise, tau = omega(beta) * median(sigma)
    with beta = min/max aspect ratio of the (n_rows x n_cols) data matrix (square if unknown);
    'full' keeps every numerically supported value.

    Whatever the rule, the result is clipped to the numerical rank, the count of
    sigma_i > sigma_max * rtol (default rtol = max(n_rows, n_cols) * eps64, right for
    SVD-computed values; `pod` passes the looser `gram_rtol`), and is at least 1 unless every
    sigma is 0 or any is non-finite (then 0).  Bad values raise ValueError naming `rank`.
    """
    kind, value = parse_rank(rank)
    sigma = torch.as_tensor(singular_values).detach().to("cpu", torch.float64).flatten()
    sigma = torch.sort(sigma, descending=True).values
    k = int(sigma.numel())
    if k == 0 or not bool(torch.isfinite(sigma).all()) or float(sigma[0]) <= 0.0:
        return 0
    rows = n_rows if n_rows is not None else k
    cols = n_cols if n_cols is not None else k
    if rtol is None:
        rtol = max(rows, cols, 1) * EPS64
    numerical = int((sigma > sigma[0] * rtol).sum())

    if kind == "cap":
        r = int(value)
    elif kind == "full":
        r = numerical
    elif kind == "energy":
        energy = torch.cumsum(sigma**2, 0) / torch.sum(sigma**2)
        # 1e-12 slack: a fraction of exactly 1.0 must not miss the last term to rounding.
        r = int((energy < value - 1e-12).sum()) + 1
    else:  # optimal hard threshold
        beta = min(rows, cols) / max(rows, cols, 1)
        # the ordinary median (torch.median takes the lower of two middle values)
        tau = hard_threshold_omega(beta) * float(torch.quantile(sigma, 0.5))
        r = int((sigma > tau).sum())
    return max(1, min(r, numerical))


def gram_rtol(n_cols: int) -> float:
    """Relative singular-value floor the method of snapshots can resolve.

    eigh(G) is accurate to ~n * eps64 * ||G||, i.e. sigma_i to ~sqrt(n * eps64) * sigma_max;
    directions below that have meaningless V columns and would make U = D V / sigma garbage.
    """
    return math.sqrt(max(n_cols, 1) * EPS64)


# --------------------------------------------------------------------------- big products


def _row_blocks(data: Tensor, differences: bool):
    """Yield (row slice, float64 block) -- the block is differenced along columns if asked.

    The differences are taken in float64 too, so the whole Gram sees no float32 rounding.
    """
    p, m = data.shape
    rows = max(1, CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, p, rows):
        stop = min(p, start + rows)
        block = data[start:stop].to(torch.float64)
        if differences:
            block = block[:, 1:] - block[:, :-1]
        yield slice(start, stop), block


def _rows_single(data: Tensor) -> Tensor | None:
    """For float32/half data (`pod`): its columns as contiguous float32 *rows*, (n, p), or None
    for float64 data (which keeps the all-float64 path).

    Why: training snapshots are float32 weights; a float32 BLAS product over contiguous rows
    is several times faster than up-casting p x m blocks to float64 (measured: 48 vs 149 ms at
    p = 530k, m = 20). Costs one float32 (n, p) array. (The DMD's differences never take this
    path: they are formed in blocks, `_difference_blocks`.)
    """
    if data.dtype == torch.float64:
        return None
    return data.T.to(torch.float32).contiguous()


@exact_precision
def column_gram(data: Tensor, *, differences: bool = False) -> Tensor:
    """float64 Gram D^T D of the columns of `data` (or of its column differences), on the CPU.

    O(p * n^2) flops; the small result goes to the CPU because everything after it is n x n
    work that is faster there than as tiny device kernels. float64 data: O(CHUNK_ELEMENTS)
    extra memory. float32/half data: the product runs in float32, over contiguous rows
    (`_rows_single`, one float32 copy), or over blocks of the differences.
    """
    if differences and data.dtype != torch.float64:
        return _difference_product(data, torch.float32).to("cpu", torch.float64)
    rows32 = _rows_single(data)
    if rows32 is not None:
        return (rows32 @ rows32.T).to("cpu", torch.float64)
    p, m = data.shape
    n = m - 1 if differences else m
    gram = torch.zeros(n, n, dtype=torch.float64, device=data.device)
    if n > 0:
        for _, block in _row_blocks(data, differences):
            gram += block.T @ block
    return gram.cpu()


@exact_precision
def rows_gram(rows: Tensor, rank: int | float | str, *, n_rows: int,
              n_pod: int | None = None) -> Tensor:
    """float64 Gram (CPU) of float32 rows (n, p), as the rank rule needs it.

    The float32 product is several times faster, but resolves singular values only down to
    ``sigma_max * sqrt(n * eps32)``; below that its directions are noise (a 6-dimensional affine
    system kept 13 modes, one with |lambda| = 1.04, and extrapolated 1e4 times worse than from a
    float64 Gram of the same numbers). So when the rule, applied to the leading `n_pod` x
    `n_pod` block (the POD's columns; default all), keeps such a direction, the product is
    redone in float64 over column blocks (``CHUNK_ELEMENTS`` extra numbers at a time). The
    default energy rule (0.99) never reaches that floor; integer caps and 'full' can.
    """
    return _rows_gram(rows, rank, n_rows=n_rows, n_pod=n_pod)[0]


def _rows_gram(rows: Tensor, rank: int | float | str, *, n_rows: int,
               n_pod: int | None) -> tuple[Tensor, int]:
    """`rows_gram`, and how many Gram products it formed (1, or 2 when it redid it in float64):
    the accelerator charges each one as DMD cost."""
    def redo() -> Tensor:
        n, p = rows.shape
        gram = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
        step = max(1, CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, p, step):
            block = rows[:, start:start + step].to(torch.float64)
            gram += block @ block.T
        return gram

    return _checked_gram(rows @ rows.T, redo, rank, n_rows=n_rows, n_pod=n_pod)


def _checked_gram(gram32: Tensor, redo, rank: int | float | str, *, n_rows: int,
                  n_pod: int | None) -> tuple[Tensor, int]:
    """The float32 Gram as float64 on the CPU, or `redo()`'s float64 one where the rank rule
    keeps a direction below the float32 floor (`rows_gram` says why); and the passes (1, 2)."""
    gram = gram32.to("cpu", torch.float64)
    k = gram.shape[0] if n_pod is None else n_pod
    small = pod_from_gram(gram[:k, :k], rank, n_rows=n_rows)
    if small.rank == 0:  # degenerate or non-finite: float64 would not change the verdict
        return gram, 1
    floor = float(small.all_singular_values[0]) * math.sqrt(max(k, 1) * EPS32)
    # The rule as it reads before the numerical-rank clip: float32 rounding can push a real
    # direction's eigenvalue below zero (sigma clamped to 0), and the clip then hid that the
    # rule wanted it, so whether the redo ran hung on the sign of the rounding (rank 6 of 7,
    # an extrapolation 2e-2 off). Judge the last direction the rule wants, not the last kept.
    wanted = select_rank(small.all_singular_values, rank, n_rows=n_rows, n_cols=k, rtol=-1.0)
    if float(small.all_singular_values[wanted - 1]) >= floor:
        return gram, 1
    return redo().cpu(), 2


DIFFERENCE_BLOCK_ELEMENTS = 1 << 23
"""float32 numbers per block of snapshot differences (32 MiB): what a fit of float32 or half
snapshots holds beyond its Gram and its basis."""


def _difference_blocks(data: Tensor):
    """Yield (row slice, float32 (m-1) x c block): the snapshots' differences, d_k = x_{k+1} -
    x_k, for c of the p coordinates at a time, in float32 arithmetic (half data up-cast first).

    Why blocks: forming all (m-1) x p differences at once doubled a fit's memory (one float32
    copy of the window beside the snapshots: 228 MB at 3 million parameters, window 20); a
    block costs 32 MiB and runs as fast: a whole fit at p = 530k, m = 20 (the default model's
    output layer) took a median 23-25 ms, against 31-33 ms with all differences at once;
    blocks of 4 MiB took 33-48 ms."""
    rows = data.T  # (m, p): the accelerator's buffers hold contiguous rows
    m, p = rows.shape
    width = max(1, DIFFERENCE_BLOCK_ELEMENTS // max(m, 1))
    for start in range(0, p, width):
        block = rows[:, start:start + width]
        if block.dtype != torch.float32:
            block = block.to(torch.float32)
        yield slice(start, start + width), block[1:] - block[:-1]


def difference_gram(data: Tensor, rank: int | float | str, *, n_pod: int) -> tuple[Tensor, int]:
    """float64 Gram (CPU) of the float32/half snapshots' differences, formed block by block
    (`_difference_blocks`), redone in float64 as `rows_gram` is; and its passes (1 or 2)."""
    return _checked_gram(_difference_product(data, torch.float32),
                         lambda: _difference_product(data, torch.float64), rank,
                         n_rows=data.shape[0], n_pod=n_pod)


def _difference_product(data: Tensor, dtype: torch.dtype) -> Tensor:
    """D^T D of the float32 differences, accumulated over blocks in `dtype`, on the device."""
    n = data.shape[1] - 1
    out = torch.zeros(n, n, dtype=dtype, device=data.device)
    for _, block in _difference_blocks(data):
        block = block.to(dtype)
        out.addmm_(block, block.T)
    return out


def combine_differences(data: Tensor, coefficients: Tensor, out_dtype: torch.dtype) -> Tensor:
    """D[:, :k] @ coefficients (p x r) for float32/half snapshots, block by block in float32."""
    k, r = coefficients.shape
    out = torch.empty(data.shape[0], r, dtype=out_dtype, device=data.device)
    coeff = coefficients.to(data.device, torch.float32)
    for rows, block in _difference_blocks(data):
        out[rows] = (block[:k].T @ coeff).to(out_dtype)
    return out


@exact_precision
def combine_columns(
    data: Tensor,
    coefficients: Tensor,
    *,
    differences: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """D[:, :k] @ coefficients (k x r, float64) as a p x r tensor on the data's device.

    Used to form the POD modes U = D V Sigma^-1 and store them in `out_dtype` (default: the
    data's dtype), so a float32 layer keeps float32 modes: one float32 product for float32
    and half data, block by block in float64 for float64 data.
    """
    if differences and data.dtype != torch.float64:
        return combine_differences(data, coefficients, out_dtype or data.dtype)
    rows32 = _rows_single(data)
    if rows32 is not None:
        return _combine_rows(rows32, coefficients, out_dtype or data.dtype)
    p = data.shape[0]
    k, r = coefficients.shape
    out = torch.empty(p, r, dtype=out_dtype or data.dtype, device=data.device)
    coeff = coefficients.to(data.device, torch.float64)
    for rows, block in _row_blocks(data, differences):
        out[rows] = (block[:, :k] @ coeff).to(out.dtype)
    return out


def _combine_rows(rows32: Tensor, coefficients: Tensor, out_dtype: torch.dtype) -> Tensor:
    """rows32[:k].T @ coefficients in float32, for a caller that holds the float32 rows."""
    k = coefficients.shape[0]
    return (rows32[:k].T @ coefficients.to(rows32.device, torch.float32)).to(out_dtype)


# --------------------------------------------------------------------------- POD


@dataclass(frozen=True)
class SnapshotPOD:
    """The small half of a POD: what the n x n Gram alone determines (all float64, CPU)."""

    singular_values: Tensor  # (r,) descending, > 0
    right_vectors: Tensor  # V, (n, r) orthonormal columns
    all_singular_values: Tensor  # (n,) descending, before truncation
    rank: int

    @property
    def coefficients(self) -> Tensor:
        """V Sigma^-1 (n x r): the column combinations that give the modes, U = D V Sigma^-1."""
        return self.right_vectors / self.singular_values


def pod_from_gram(gram: Tensor, rank: int | float | str, *, n_rows: int) -> SnapshotPOD:
    """Method of snapshots on an n x n Gram: eigh, sigma = sqrt(eigenvalues), rank rule."""
    gram = gram.to("cpu", torch.float64)
    n = gram.shape[0]
    parse_rank(rank)  # validate even when the data is degenerate
    if n == 0 or not bool(torch.isfinite(gram).all()):
        empty = torch.zeros(0, dtype=torch.float64)
        return SnapshotPOD(empty, torch.zeros(n, 0, dtype=torch.float64), empty, 0)
    evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    order = torch.argsort(evals, descending=True)
    sigma_all = torch.sqrt(torch.clamp(evals[order], min=0.0))
    evecs = evecs[:, order]
    r = select_rank(sigma_all, rank, n_rows=n_rows, n_cols=n, rtol=gram_rtol(n))
    return SnapshotPOD(sigma_all[:r].clone(), evecs[:, :r].clone(), sigma_all, r)


@dataclass(frozen=True)
class POD:
    """Truncated POD of a p x n matrix: D ~ U diag(sigma) V^T."""

    modes: Tensor  # U, (p, r), the data's dtype and device
    small: SnapshotPOD

    @property
    def singular_values(self) -> Tensor:
        return self.small.singular_values

    @property
    def right_vectors(self) -> Tensor:
        return self.small.right_vectors

    @property
    def rank(self) -> int:
        return self.small.rank


@exact_precision
def pod(data: Tensor, rank: int | float | str = "full") -> POD:
    """POD of the columns of `data` (p x n) by the method of snapshots, truncated by `rank`.

    Cost O(p * n^2) for the Gram plus O(p * n * r) for the modes; no p x p matrix is formed.
    """
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-D (p x n) tensor; got shape {tuple(data.shape)}")
    rows32 = _rows_single(data)
    gram = column_gram(data) if rows32 is None else rows_gram(rows32, rank, n_rows=data.shape[0])
    small = pod_from_gram(gram, rank, n_rows=data.shape[0])
    if rows32 is not None:  # the float32 rows are at hand: no second copy of them
        return POD(_combine_rows(rows32, small.coefficients, data.dtype), small)
    return POD(combine_columns(data, small.coefficients), small)
