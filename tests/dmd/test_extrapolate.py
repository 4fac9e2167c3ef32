"""The affine-exact DMD extrapolation: exactness, PyDMD agreement, stability, safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdopt.dmd import dmd_flops, extrapolate, fit_dmd, horizon_gain, stabilized_gain

F64 = torch.float64


def _dynamics(eigs: list[complex], p: int = 20, seed: int = 0):
    """A (p x p) whose nonzero spectrum is `eigs` (conjugate pairs as 2x2 blocks), non-normal,
    living on a random len(eigs)-dimensional subspace; plus a random b and x0."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for lam in eigs:
        lam = complex(lam)
        if lam.imag > 0:
            blocks.append(torch.tensor([[lam.real, -lam.imag], [lam.imag, lam.real]], dtype=F64))
        elif lam.imag == 0:
            blocks.append(torch.tensor([[lam.real]], dtype=F64))
    core = torch.block_diag(*blocks)
    k = core.shape[0]
    basis = torch.linalg.qr(torch.randn(p, k, dtype=F64, generator=gen))[0]
    skew = torch.eye(k, dtype=F64) + 0.3 * torch.randn(k, k, dtype=F64, generator=gen)
    a = basis @ (skew @ core @ torch.linalg.inv(skew)) @ basis.T
    return a, torch.randn(p, dtype=F64, generator=gen), torch.randn(p, dtype=F64, generator=gen)


def _trajectory(a, b, x0, steps: int) -> list[torch.Tensor]:
    xs = [x0]
    for _ in range(steps):
        xs.append(a @ xs[-1] + b)
    return xs


def _rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


STABLE = [0.35, 0.5, 0.65, 0.8, 0.93]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_on_linear_dynamics(seed):
    a, _, x0 = _dynamics(STABLE, seed=seed)
    m = 23  # >= p + 3
    xs = _trajectory(a, 0.0, x0, m + 50)
    snapshots = torch.stack(xs[:m], 1)
    fit = fit_dmd(snapshots, rank=100)
    assert fit.status == "ok"
    for h in (1, 7, 50):
        assert _rel(fit.predict(h), xs[m - 1 + h]) < 1e-6
    assert _rel(extrapolate(snapshots, rank=100, horizon=7), xs[m - 1 + 7]) < 1e-6


@pytest.mark.parametrize("eigs", [STABLE, [0.3, 0.6, 0.85 * np.exp(0.4j), 0.9, 0.5 * np.exp(2j)]])
def test_exact_on_affine_dynamics_and_fixed_point(eigs):
    a, b, x0 = _dynamics(eigs, seed=3)
    m = 15
    xs = _trajectory(a, b, x0, m + 50)
    snapshots = torch.stack(xs[:m], 1)
    fit = fit_dmd(snapshots, rank=1.0)
    for h in (1, 7, 50):
        assert _rel(fit.predict(h), xs[m - 1 + h]) < 1e-6
    fixed_point = torch.linalg.solve(torch.eye(20, dtype=F64) - a, b)
    for inf in (math.inf, float("inf"), "inf"):
        assert _rel(fit.predict(inf), fixed_point) < 1e-6
    # plain DMD of the snapshots would not be exact here: b is not a linear mode
    assert _rel(fit.last, fixed_point) > 1e-2


def test_non_integer_horizon_interpolates_positive_modes():
    a = 0.8 * torch.eye(5, dtype=F64)
    b = torch.arange(5, dtype=F64)
    xs = _trajectory(a, b, torch.ones(5, dtype=F64), 6)
    fixed_point = b / 0.2
    fit = fit_dmd(torch.stack(xs, 1), rank=1)
    expected = fixed_point + 0.8**2.5 * (xs[-1] - fixed_point)
    assert _rel(fit.predict(2.5), expected) < 1e-10


def test_constant_drift_is_neutral():
    # lambda = 1: finite horizons drift linearly, horizon=inf does not extrapolate
    v = torch.linspace(-1, 1, 30, dtype=F64)
    snapshots = torch.ones(30, 1, dtype=F64) + v[:, None] * torch.arange(6, dtype=F64)
    fit = fit_dmd(snapshots, rank=3)
    assert fit.rank == 1
    for h in (1, 10, 1000):
        assert _rel(fit.predict(h), snapshots[:, -1] + h * v) < 1e-10
    assert torch.equal(fit.predict("inf"), snapshots[:, -1])


def test_rotation_on_unit_circle_is_exact():
    a, b, x0 = _dynamics([np.exp(0.3j)], p=10, seed=4)
    xs = _trajectory(a, b, x0, 1010)
    snapshots = torch.stack(xs[:8], 1)
    fit = fit_dmd(snapshots, rank=5)
    moduli = fit.eigenvalues.abs().sort(descending=True).values
    assert torch.allclose(moduli[:2], torch.ones(2, dtype=F64), atol=1e-12)  # + a 0 from x0
    for h in (5, 100, 1000):
        assert _rel(fit.predict(h), xs[7 + h]) < 1e-8


# --------------------------------------------------------------------------- PyDMD oracle


@pytest.mark.parametrize("r", [2, 5, 9])
def test_eigenvalues_match_pydmd(r):
    pydmd = pytest.importorskip("pydmd")
    rng = np.random.default_rng(r)
    snapshots = rng.standard_normal((60, 14))
    oracle = pydmd.DMD(svd_rank=r)
    oracle.fit(np.diff(snapshots, axis=1))
    fit = fit_dmd(torch.from_numpy(snapshots), rank=r)
    assert fit.rank == r
    assert fit.eigenvalues.dtype == torch.complex128
    expected = np.sort_complex(np.asarray(oracle.eigs))
    np.testing.assert_allclose(np.sort_complex(fit.eigenvalues.numpy()), expected, atol=1e-8)
    assert fit.modes.shape == (60, r)


# --------------------------------------------------------------------------- stability


def test_growing_mode_is_not_amplified():
    a, b, x0 = _dynamics([1.2, 0.9, 0.6, -0.5], seed=5)
    m = 12
    xs = _trajectory(a, b, x0, m - 1)
    snapshots = torch.stack(xs, 1)
    scale = float(snapshots.norm(dim=0).max())
    fit = fit_dmd(snapshots, rank=1.0)
    assert fit.eigenvalues.abs().max() == pytest.approx(1.2, rel=1e-8)
    for h in (1, 10, 1000, "inf"):
        pred = fit.predict(h)
        assert torch.isfinite(pred).all()
        assert float(pred.norm()) < 3 * scale
        assert float((pred - fit.last).norm()) <= fit.displacement_bound(h) * (1 + 1e-9) + 1e-12


def test_pure_growth_stays_at_last_snapshot():
    v = torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(6))
    snapshots = v[:, None] * 1.1 ** torch.arange(8, dtype=F64)
    fit = fit_dmd(snapshots, rank=2)
    assert fit.eigenvalues.abs().item() == pytest.approx(1.1)
    for h in (1, 1000):
        assert torch.equal(fit.predict(h), snapshots[:, -1])


def test_drift_policy_continues_growing_modes_at_their_last_step():
    v = torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(6))
    snapshots = v[:, None] * 1.1 ** torch.arange(8, dtype=F64)
    fit = fit_dmd(snapshots, rank=2)
    last_step = snapshots[:, -1] - snapshots[:, -2]
    for h in (1, 7, 1000):  # projected onto the unit circle: h more steps of the last length
        expected = snapshots[:, -1] + h * last_step
        assert torch.allclose(fit.predict(h, growing="drift"), expected, rtol=1e-9, atol=0)
        bound = fit.displacement_bound(h, growing="drift")
        assert float((expected - snapshots[:, -1]).norm()) <= bound * (1 + 1e-9)
    assert torch.equal(fit.predict(math.inf, growing="drift"), snapshots[:, -1])  # never to inf
    with pytest.raises(ValueError, match="growing must be one of"):
        fit.predict(5, growing="grow")
    with pytest.raises(ValueError, match="growing=.*'x'"):
        extrapolate(snapshots, rank=2, horizon=5, growing="x")


def test_drift_policy_keeps_decaying_modes_exact():
    a, b, x0 = _dynamics([0.9, 0.6, -0.5], seed=3)
    xs = _trajectory(a, b, x0, 30)
    fit = fit_dmd(torch.stack(xs[:12], 1), rank=1.0)
    assert torch.allclose(fit.predict(19, growing="drift"), xs[30], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_random_unstable_data_respects_documented_bound(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(15, 15, dtype=F64, generator=gen)
    a *= 1.3 / torch.linalg.eigvals(a).abs().max()
    xs = _trajectory(
        a, torch.randn(15, dtype=F64, generator=gen), torch.randn(15, dtype=F64, generator=gen), 11
    )
    snapshots = torch.stack(xs, 1)
    for rank in (3, 0.999, 0):
        fit = fit_dmd(snapshots, rank=rank)
        for h in (1, 10, 1000, math.inf):
            delta = float((fit.predict(h) - fit.last).norm())
            assert math.isfinite(delta)
            assert delta <= fit.displacement_bound(h) * (1 + 1e-9) + 1e-12
            # the bound itself: kept gains are those of |lambda| <= 1 eigenvalues
            if math.isfinite(h):
                assert stabilized_gain(fit.eigenvalues, h).abs().max() <= h * (1 + 1e-12)


@pytest.mark.parametrize("h", [1, 3, 17, 2.5, 1000])
def test_horizon_gain_is_stable(h):
    lam = np.array([0, 0.5, -0.7, 0.9 + 0.3j, 1 - 1e-9, 1 - 1e-13, 1, np.exp(0.2j), -1])
    got = horizon_gain(torch.from_numpy(lam.astype(complex)), h).numpy()
    if float(h).is_integer():
        expected = np.array([sum(x**j for j in range(1, int(h) + 1)) for x in lam.astype(complex)])
    else:  # principal-branch closed form, with lambda -> 1 limits by series
        with np.errstate(all="ignore"):
            expected = lam * (1 - lam.astype(complex) ** h) / (1 - lam)
        expected[6] = h
        expected[4] = h * (1 - (h + 1) / 2 * 1e-9)
        expected[5] = h * (1 - (h + 1) / 2 * 1e-13)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-14 * h + 1e-12)
    assert np.isfinite(got).all()


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_snapshots_return_last_snapshot(bad):
    snapshots = torch.randn(30, 8, dtype=F64)
    snapshots[3, 4] = bad
    fit = fit_dmd(snapshots, rank=3)
    assert fit.status == "non_finite"
    out = extrapolate(snapshots, rank=3, horizon=10)
    assert torch.equal(out, snapshots[:, -1])
    out[0] = 123.0  # a copy, not a view
    assert snapshots[0, -1] != 123.0


def test_overflowing_dmd_returns_last_snapshot():
    snapshots = 1e200 * torch.randn(30, 8, dtype=F64)  # finite, but the Gram overflows
    assert torch.equal(extrapolate(snapshots, rank=3, horizon=5), snapshots[:, -1])


@pytest.mark.parametrize("m", [1, 2])
def test_too_few_snapshots_return_last(m):
    snapshots = torch.randn(10, m)
    assert torch.equal(extrapolate(snapshots, rank=2, horizon=5), snapshots[:, -1])


def test_converged_returns_last():
    snapshots = torch.ones(10, 6) * torch.arange(10.0)[:, None]
    fit = fit_dmd(snapshots, rank=0.99)
    assert fit.status == "converged" and fit.rank == 0
    assert torch.equal(fit.predict("inf"), snapshots[:, -1])


@pytest.mark.parametrize("horizon", [0, -1, math.nan, -math.inf, True, "soon", None])
def test_bad_horizon_raises(horizon):
    with pytest.raises(ValueError, match="horizon"):
        extrapolate(torch.randn(5, 4), rank=1, horizon=horizon)


@pytest.mark.parametrize("tol", [-1e-3, 1.0, 2.0, math.nan, "small", True])
def test_bad_tol_raises(tol):
    """tol >= 1 called lambda = 0 neutral (0/0: the prediction silently fell back to the last
    snapshot); NaN made every mode growing."""
    with pytest.raises(ValueError, match="tol"):
        extrapolate(torch.randn(5, 6, dtype=F64), rank=2, horizon=5, tol=tol)
    with pytest.raises(ValueError, match="tol"):
        fit_dmd(torch.randn(5, 6, dtype=F64), rank=2).predict(5, tol=tol)


def test_bad_rank_raises_even_for_trivial_data():
    with pytest.raises(ValueError, match="rank=-2"):
        fit_dmd(torch.randn(5, 2), rank=-2)


# --------------------------------------------------------------------------- dtype / device / size


def test_float32_input_keeps_dtype_and_is_accurate():
    a, b, x0 = _dynamics(STABLE, seed=7)
    xs = _trajectory(a, b, x0, 80)
    snapshots = torch.stack(xs[:15], 1).float()
    out = extrapolate(snapshots, rank=0.999999, horizon=50)
    assert out.dtype == torch.float32 and out.device == snapshots.device
    assert _rel(out.double(), xs[64]) < 1e-3


@pytest.mark.parametrize("rank", [1.0, "full", 16])
def test_float32_snapshots_keep_no_noise_modes(rank):
    """A float32 Gram resolves singular values only to ~1e-3 of the largest: rank rules that
    reach below that get a float64 Gram, so float32 data extrapolates as well as its float64
    copy (the float32 product alone kept 13 modes here, one growing, and was 1e4x worse)."""
    a, b, x0 = _dynamics([0.3, 0.5, 0.7, 0.85, 0.95, 0.99], p=400, seed=0)
    xs = _trajectory(a, b, x0, 60)
    snapshots = torch.stack(xs[:20], 1).float()
    fit32, fit64 = fit_dmd(snapshots, rank=rank), fit_dmd(snapshots.double(), rank=rank)
    assert fit32.rank == fit64.rank
    step = (xs[39] - xs[19]).norm()
    err32 = float((fit32.predict(20).double() - xs[39]).norm() / step)
    err64 = float((fit64.predict(20) - xs[39]).norm() / step)
    assert err32 < 1e-4 and err32 < 2 * err64 + 1e-5
    assert float(fit32.eigenvalues.abs().max()) < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_snapshots_keep_dtype(dtype):
    snapshots = torch.cumsum(torch.randn(200, 8, generator=torch.Generator().manual_seed(9)), 1)
    fit = fit_dmd(snapshots.to(dtype), rank=3)
    out = fit.predict(5)
    assert fit.basis.dtype == torch.float32  # half data, float32 basis
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_float16_overflow_returns_the_last_snapshot():
    # A steady drift of 500 per step from 50,000: 100 steps on is past float16's 65,504.
    snapshots = (50_000 + 500 * torch.arange(10.0))[None, :] * torch.ones(8, 1)
    fit = fit_dmd(snapshots.to(torch.float16), rank=2)
    assert float(fit.predict(10)[0]) == pytest.approx(59_500, rel=0.02)  # in range: extrapolated
    out = fit.predict(100)
    assert out.dtype == torch.float16 and torch.equal(out, snapshots[:, -1].to(torch.float16))


def test_no_autograd_graph():
    snapshots = torch.randn(10, 6, requires_grad=True)
    out = extrapolate(snapshots, rank=2, horizon=3)
    assert not out.requires_grad


LARGE_P = """
import resource, torch
from dmdopt.dmd import fit_dmd
snapshots = torch.rand(2_000_000, 10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit = fit_dmd(snapshots, rank=4)
outs = [fit.predict(h) for h in (1, 10, "inf")]
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
assert fit.basis.dtype == torch.float32 and fit.basis.shape == (2_000_000, 4)
assert all(o.shape == (2_000_000,) and o.dtype == torch.float32 for o in outs)
print(grown_mb)
"""


def test_large_p_runs_without_p_by_p():
    """A p x p float64 matrix here would be 32 TB: the fit's peak memory must stay O(p m).
    In a fresh process, so that an earlier test's peak cannot hide this one's (ru_maxrss)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LARGE_P], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb = float(out.stdout.split()[-1])
    # the snapshots are 80 MB; basis, float64 row blocks and three predictions a few times that
    assert grown_mb < 1024


HALF_FIT = """
import resource, sys, torch
from dmdopt.dmd import fit_dmd
p, m = 6_000_000, 20
torch.manual_seed(0)
buf = torch.empty(m, p, dtype=getattr(torch, sys.argv[1]))  # the accelerator's row layout
x, v = torch.randn(p), torch.randn(p)
for k in range(m):
    buf[k].copy_(x + 0.9 ** k * v)
del x, v
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit = fit_dmd(buf.T, rank=0.99)
assert fit.status == "ok"
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_a_fit_never_holds_all_differences_at_once():
    """A fit formed the window's (m-1) x p float32 differences at once, doubling the memory a
    window takes (and bfloat16 snapshots, which exist to halve it, peaked above float32 ones
    while they were up-cast whole). It now works on 32 MiB blocks of them."""
    import subprocess
    import sys

    grown = {}
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", HALF_FIT, dtype], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        grown[dtype] = float(out.stdout.split()[-1])
    differences_mb = 4 * 19 * 6_000_000 / 2**20  # the float32 (m-1) x p rows: 435 MB
    # measured 0-130 MB (the allocator keeps some freed blocks); 401 and 458 MB before
    assert grown["float32"] < 0.5 * differences_mb, grown
    assert grown["bfloat16"] < 0.5 * differences_mb, grown


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b, x0 = _dynamics(STABLE, seed=8)
    snapshots = torch.stack(_trajectory(a, b, x0, 14), 1)
    for dtype in (torch.float64, torch.float32):
        gpu = extrapolate(snapshots.to("cuda", dtype), rank=1.0, horizon=20)
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        cpu = extrapolate(snapshots.to(dtype), rank=1.0, horizon=20)
        assert _rel(gpu.cpu().double(), cpu.double()) < (1e-10 if dtype == F64 else 1e-4)


# --------------------------------------------------------------------------- cost model


def test_dmd_flops():
    # p=1000, m=10, r=4 (n1=9, n=8): big 244_000 + small 9_194
    assert dmd_flops(1000, 10, 4) == 253_194
    assert dmd_flops(1000, 2, 4) == 0
    assert dmd_flops(1000, 10, 50) == dmd_flops(1000, 10, 8)  # r <= m - 2
    # dominated by the O(p m^2) Gram
    assert dmd_flops(2_000_000, 10, 4) == pytest.approx(2 * dmd_flops(1_000_000, 10, 4), rel=1e-4)
    for bad in ((-1, 10, 4), (10, 10.0, 4), (10, 10, True)):
        with pytest.raises(ValueError):
            dmd_flops(*bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_region_does_not_reach_the_fit(dtype):
    # the caller's autocast (a training loop under torch.autocast) must not run the Gram and
    # basis products in half precision: a small move on a large state was lost to it
    torch.manual_seed(1)
    t = torch.arange(20.0)
    X = 0.3 + torch.rand(4000, 1) + 1e-4 * (torch.randn(4000, 1) * 0.9 ** t)
    plain = extrapolate(X, rank=1, horizon=10)
    fit = fit_dmd(X, rank=1)
    with torch.autocast("cpu", dtype=dtype):
        inside = extrapolate(X, rank=1, horizon=10)
        moved = fit.displacement(10)
    assert inside.dtype == torch.float32 and moved.dtype == torch.float32
    assert torch.equal(inside, plain)
    assert torch.equal(moved, fit.displacement(10))
    assert float((plain - X[:, -1]).abs().max()) > 1e-5  # a move that half precision loses


def test_the_autocast_guard_works_with_the_torch_2_2_api(monkeypatch):
    """torch < 2.4 has `is_autocast_enabled()` without a device argument (pyproject allows
    2.2): the guard raised TypeError there on every fit."""
    import importlib

    pod_module = importlib.import_module("dmdopt.dmd.pod")  # (dmdopt.dmd.pod is also a function)

    cpu_on = {"on": False}

    def old_api(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return False  # CUDA's flag

    monkeypatch.setattr(torch, "is_autocast_enabled", old_api)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: cpu_on["on"], raising=False)
    assert pod_module._autocast_enabled("cpu") is False and pod_module._autocast_enabled("xpu") is False
    X = torch.cumsum(torch.randn(50, 8, generator=torch.Generator().manual_seed(3)), 1)
    assert torch.isfinite(extrapolate(X, rank=2, horizon=5)).all()  # no autocast to leave
    cpu_on["on"] = True  # (entering torch 2.13's autocast itself needs the new API: not here)
    assert pod_module._autocast_enabled("cpu") is True


@pytest.mark.parametrize("slow", [1 - 5e-7, 1 - 1e-7])
def test_a_mode_decaying_within_the_neutral_band_is_summed_exactly(slow):
    """Affine dynamics with an eigenvalue just below 1 (GD's slowest direction): the band
    below 1 was projected onto the circle, so the mode moved h steps instead of
    sum slow^j: 2.5e-5 off at h = 100 and 2.5e-4 at h = 1000."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 2, dtype=F64, generator=gen))
    lam = torch.tensor([slow, 0.5], dtype=F64)
    coef = torch.tensor([1.0, 0.7], dtype=F64)
    m, hmax = 8, 1000
    steps = torch.stack([q @ (coef * lam**k) for k in range(m - 1 + hmax)], 1)  # d_k
    xs = torch.cat([torch.zeros(40, 1, dtype=F64), steps.cumsum(1)], 1)  # x_k = sum_{j<k} d_j
    fit = fit_dmd(xs[:, :m], rank=10)
    for h in (100, hmax):
        truth = xs[:, m - 1 + h]
        move = truth - xs[:, m - 1]
        assert float((fit.predict(h) - truth).norm() / move.norm()) < 1e-6, h
    # horizon=inf still leaves such a mode where it is (gain above 1 / tol)
    assert float((fit.predict("inf") - xs[:, m - 1]).norm()) < 2 * float(
        (xs[:, m - 1] - xs[:, m - 2]).norm())


def test_snapshots_given_time_down_the_rows_are_named_not_a_memory_error():
    """A (m x p) window of 200,000 'snapshots' asked for a 149 GiB Gram: a raw allocator error."""
    with pytest.raises(ValueError, match=r"\(p x m\), one snapshot per column; got shape "
                                         r"\(10, 200000\).*snapshots\.T"):
        extrapolate(torch.randn(200_000, 10).T, rank=5, horizon=10)
    # more snapshots than coordinates is still a window (p = 3, m = 12)
    assert extrapolate(torch.randn(3, 12, dtype=F64), rank=2, horizon=3).shape == (3,)
