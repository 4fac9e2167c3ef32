"""Verification of the finite-volume solver: convergence order, positivity,
symmetry, exact mass balance and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmdopt.problem.solver import (
    boundary_outflow,
    cell_centres,
    far_field_coefficient,
    gaussian_source,
    solve_field,
    solve_with_source,
)

# Manufactured solution c = exp(A x) cos(B y + PHI) + x² y: smooth, not symmetric,
# and not satisfying the boundary condition, so the inhomogeneous term is exercised.
A, B, PHI = 0.7, 1.9, 0.3


def _exact(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """c, ∂c/∂x, ∂c/∂y, Δc."""
    ex, cy, sy = np.exp(A * x), np.cos(B * y + PHI), np.sin(B * y + PHI)
    c = ex * cy + x * x * y
    cx = A * ex * cy + 2 * x * y
    cyy = -B * ex * sy + x * x
    lap = (A * A - B * B) * ex * cy + 2 * y
    return c, cx, cyy, lap


def _manufactured_error(n: int, vx: float, vy: float, d: float, k: float) -> float:
    xc = cell_centres(n)
    x, y = np.meshgrid(xc, xc, indexing="ij")
    c, cx, cy, lap = _exact(x, y)
    source = -d * lap + vx * cx + vy * cy + k * c

    def g(side: str, xf: np.ndarray, yf: np.ndarray) -> np.ndarray:
        # Outward normal (nx, ny); exact total flux u c - D ∂c/∂n minus β c.
        nx, ny = {"west": (-1, 0), "east": (1, 0), "south": (0, -1), "north": (0, 1)}[side]
        cf, cxf, cyf, _ = _exact(xf, yf)
        u = vx * nx + vy * ny
        flux = u * cf - d * (cxf * nx + cyf * ny)
        return flux - far_field_coefficient(u, d, k) * cf

    zeros, ones = np.zeros(n), np.ones(n)
    bflux = {
        "west": g("west", zeros, xc),
        "east": g("east", ones, xc),
        "south": g("south", xc, zeros),
        "north": g("north", xc, ones),
    }
    num = solve_with_source(
        source, wind_x=vx, wind_y=vy, diffusivity=d, decay=k, boundary_flux=bflux
    )
    return float(np.sqrt(np.mean((num - c) ** 2)))


@pytest.mark.parametrize(
    ("regime", "vx", "vy", "d", "k", "min_order"),
    [
        ("advective", 0.8, -0.6, 0.005, 0.5, 0.9),  # upwind: first order
        ("diffusive", 0.0, 0.0, 1.0, 1.0, 1.8),  # central diffusion: second order
    ],
)
def test_manufactured_solution_order(regime, vx, vy, d, k, min_order):
    grids = [16, 32, 64, 128]
    errs = [_manufactured_error(n, vx, vy, d, k) for n in grids]
    orders = [math.log2(e0 / e1) for e0, e1 in zip(errs, errs[1:], strict=False)]
    print(
        f"\n{regime}: L2 errors {[f'{e:.3e}' for e in errs]}, observed orders "
        f"{[f'{o:.2f}' for o in orders]}"
    )
    assert errs[-1] < errs[0]
    assert orders[-1] >= min_order, orders


def test_non_negative_for_non_negative_source():
    rng = np.random.default_rng(1)
    cases = [
        dict(wind_x=1.0, wind_y=0.0, diffusivity=1e-4, decay=0.0),
        dict(wind_x=-0.6, wind_y=0.8, diffusivity=1e-4, decay=0.3),
        dict(wind_x=0.0, wind_y=0.0, diffusivity=1e-4, decay=1.0),
    ]
    for _ in range(5):
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0, 1)
        cases.append(
            dict(
                wind_x=speed * np.cos(angle),
                wind_y=speed * np.sin(angle),
                diffusivity=10 ** rng.uniform(-4, 0),
                decay=rng.uniform(0, 2),
            )
        )
    for case in cases:
        s = rng.uniform(0, 1, size=(32, 32)) * (rng.uniform(size=(32, 32)) < 0.3)
        c = solve_with_source(s, **case)
        assert c.min() >= 0.0, (case, c.min())
        c = solve_field(source_x=rng.uniform(), source_y=rng.uniform(), grid=32, **case)
        assert c.min() >= 0.0, (case, c.min())


def test_symmetry_no_wind_centred_source():
    c = solve_field(
        source_x=0.5,
        source_y=0.5,
        wind_x=0.0,
        wind_y=0.0,
        diffusivity=0.02,
        decay=0.5,
        grid=32,
        source_width=0.1,
    )
    scale = np.abs(c).max()
    np.testing.assert_allclose(c, c.T, rtol=0, atol=1e-12 * scale)  # x <-> y
    np.testing.assert_allclose(c, c[::-1, :], rtol=0, atol=1e-12 * scale)  # x -> 1-x
    np.testing.assert_allclose(c, c[:, ::-1], rtol=0, atol=1e-12 * scale)


def test_symmetry_wind_along_x():
    c = solve_field(
        source_x=0.3,
        source_y=0.5,
        wind_x=0.7,
        wind_y=0.0,
        diffusivity=0.01,
        decay=0.2,
        grid=32,
        source_width=0.1,
    )
    scale = np.abs(c).max()
    np.testing.assert_allclose(c, c[:, ::-1], rtol=0, atol=1e-12 * scale)  # y -> 1-y
    # Sanity that the wind does something: more pollutant downwind than upwind.
    assert c[-8:, :].sum() > 2 * c[:8, :].sum()


def test_wind_is_continuous_across_zero():
    """The far-field condition does not switch type when a wind component flips sign."""
    kw = dict(source_x=0.4, source_y=0.5, wind_x=0.5, diffusivity=0.03, decay=0.3, grid=32)
    a = solve_field(wind_y=1e-9, **kw)
    b = solve_field(wind_y=-1e-9, **kw)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-6


@pytest.mark.parametrize(
    "case",
    [
        dict(wind_x=0.7, wind_y=-0.4, diffusivity=0.01, decay=0.3),
        dict(wind_x=0.0, wind_y=0.0, diffusivity=0.05, decay=1.0),
        dict(wind_x=-1.0, wind_y=0.2, diffusivity=1e-4, decay=0.0),
    ],
)
def test_global_mass_balance(case):
    n = 48
    h = 1.0 / n
    s = gaussian_source(n, source_x=0.35, source_y=0.6, source_width=0.08)
    c = solve_with_source(s, **case)
    produced = s.sum() * h * h
    removed = case["decay"] * c.sum() * h * h + boundary_outflow(c, **case)
    assert removed == pytest.approx(produced, rel=1e-10)
    # Same balance with inhomogeneous boundary data (as used by the manufactured test).
    rng = np.random.default_rng(0)
    g = {side: rng.uniform(-0.05, 0.05, n) for side in ("west", "east", "south", "north")}
    c = solve_with_source(s, boundary_flux=g, **case)
    removed = case["decay"] * c.sum() * h * h + boundary_outflow(c, boundary_flux=g, **case)
    assert removed == pytest.approx(produced, rel=1e-10)


def test_output_shape_dtype_and_units():
    c = solve_field(
        source_x=0.5, source_y=0.5, wind_x=0.3, wind_y=0.1, diffusivity=0.05, decay=0.5, grid=20
    )
    assert c.shape == (20, 20) and c.dtype == np.float64
    c2 = solve_field(
        source_x=0.5,
        source_y=0.5,
        wind_x=0.3,
        wind_y=0.1,
        diffusivity=0.05,
        decay=0.5,
        grid=20,
        source_strength=2.0,
    )
    np.testing.assert_allclose(c2, 2 * c, rtol=1e-12)  # linear in the source


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (dict(diffusivity=0.0), r"diffusivity must be > 0, got 0\.0"),
        (dict(diffusivity=-1.0), r"diffusivity.*-1\.0"),
        (dict(decay=-0.1), r"decay must be >= 0, got -0\.1"),
        (dict(grid=3), r"grid must be an integer >= 4, got 3"),
        (dict(grid=16.0), r"grid.*16\.0"),
        (dict(wind_x=float("nan")), r"wind_x must be a finite number, got nan"),
        (dict(source_y=float("inf")), r"source_y must be a finite number, got inf"),
        (dict(source_width=0.0), r"source_width must be > 0"),
        (dict(wind_x=0.0, wind_y=0.0, decay=0.0), r"no steady state"),
    ],
)
def test_input_validation(override, pattern):
    kw = dict(
        source_x=0.5, source_y=0.5, wind_x=0.1, wind_y=0.2, diffusivity=0.05, decay=0.1, grid=8
    )
    kw.update(override)
    with pytest.raises(ValueError, match=pattern):
        solve_field(**kw)
