"""Probe: time-delay (Hankel) DMD for optimisers with momentum.

dmdopt's DMD fits a first-order map to the weight differences, d_{k+1} = A d_k, which is exact
for gradient descent near a minimum. Heavy-ball momentum (SGD+momentum; Adam's first moment
is similar) is second order: d_{k+1} = (I - lr H + beta) d_k - beta d_{k-1}, so each
curvature direction carries two eigenvalues along one weight direction. When the trajectory
spans fewer directions than the window has snapshots, the POD basis has one dimension per
direction and the first-order fit cannot hold both; stacking q consecutive POD coefficient
vectors, s_k = [z_k; ..; z_{k+q-1}], makes the map first order again. Everything but the final
U z (p x r times r) is in the r-dimensional coefficient space, so the cost is that of the
default fit.

Part 1 (exactness): heavy-ball on a 5-direction quadratic in 300 dimensions, a window of 20,
the displacement's relative error at horizons 5, 20, 60.
Part 2 (training): `train` with the default DMD against the same DMD with the time-delay fit
(`--delays 2`), one method and seed, the cost to plain's final error.

    python benchmarks/probe_delay_dmd.py [--method sgd_momentum] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch


def delay_displacement(snapshots: torch.Tensor, rank: float, horizon: float, *, delays: int,
                       growing: str = "drop") -> torch.Tensor:
    """x_{m-1+h} - x_{m-1} (p,) from the snapshots (p x m) by DMD of the delay-stacked POD
    coefficients of the differences (float64 throughout; this is a probe)."""
    from dmdopt.dmd.extrapolate import stabilized_gain

    diffs = (snapshots[:, 1:] - snapshots[:, :-1]).to(torch.float64)  # p x n
    n = diffs.shape[1]
    evals, vecs = torch.linalg.eigh(diffs.T @ diffs)  # POD by the method of snapshots
    evals, vecs = evals.flip(0).clamp(min=0), vecs.flip(1)
    energy = torch.cumsum(evals, 0) / evals.sum()
    r = int((energy < rank).sum()) + 1 if rank < 1 else int(rank)
    r = max(1, min(r, n - delays - 1, int((evals > evals[0] * 1e-12).sum())))
    basis = diffs @ vecs[:, :r] / evals[:r].sqrt()  # U, p x r
    coeff = basis.T @ diffs  # z_k, r x n
    stacked = torch.cat([coeff[:, i:n - delays + 1 + i] for i in range(delays)])  # rq x (n-q+1)
    u, s, vh = torch.linalg.svd(stacked[:, :-1], full_matrices=False)
    keep = s > s[0] * 1e-10
    u, s, vh = u[:, keep], s[keep], vh[keep]
    eigenvalues, eigenvectors = torch.linalg.eig(u.T @ stacked[:, 1:] @ vh.T / s)
    amplitudes = torch.linalg.solve(eigenvectors, (u.T @ stacked[:, -1]).to(torch.complex128))
    gain = stabilized_gain(eigenvalues, horizon, growing=growing)
    future = (u.to(torch.complex128) @ (eigenvectors @ (gain * amplitudes))).real
    return basis @ future[-r:]  # the last block: the sum of the next h differences' z


class DelayFit:
    """Stands in for `fit_dmd`'s result inside the accelerator: its status, rank and cost are
    the default fit's, its displacement the time-delay one."""

    def __init__(self, snapshots, rank, delays, fit_dmd):
        self.snapshots, self.rank_rule, self.delays = snapshots, rank, delays
        inner = fit_dmd(snapshots, rank=rank)
        self.status, self.rank, self.gram_passes = inner.status, inner.rank, inner.gram_passes

    def displacement(self, horizon, *, growing="drop"):
        if self.status != "ok":
            return None
        move = delay_displacement(self.snapshots, self.rank_rule, horizon, delays=self.delays,
                                  growing=growing).to(self.snapshots.dtype)
        return move if bool(torch.isfinite(move).all()) else None


def exactness() -> None:
    from dmdopt.dmd import fit_dmd

    torch.manual_seed(0)
    p, dirs, lr, beta = 300, 5, 1.0, 0.9
    q, _ = torch.linalg.qr(torch.randn(p, dirs, dtype=torch.float64))
    hessian = q @ torch.diag(torch.tensor([0.05, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)) @ q.T
    optimum = torch.randn(p, dtype=torch.float64)
    x, velocity, path = torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64), []
    for _ in range(100):
        velocity = beta * velocity - lr * (hessian @ (x - optimum))
        x = x + velocity
        path.append(x.clone())
    path = torch.stack(path, 1)
    window = path[:, :20]
    print("heavy-ball on a 5-direction quadratic, window 20: relative error of the displacement")
    for h in (5, 20, 60):
        true = path[:, 19 + h] - window[:, -1]
        first = fit_dmd(window, rank=0.999999).displacement(h)
        delay = delay_displacement(window, 0.999999, h, delays=2)
        print(f"  h = {h:2d}: first-order DMD {float((first - true).norm() / true.norm()):.3g}, "
              f"time-delay DMD (q = 2) {float((delay - true).norm() / true.norm()):.3g}")


def training(args) -> None:
    import dmdopt.dmd as dmd_package
    from dmdopt.bench import LEARNING_RATES, _configs, _dataset, _problem
    from dmdopt.training.config import DMDConfig
    from dmdopt.training.loop import train

    real = dmd_package.fit_dmd
    lr = args.lr or LEARNING_RATES[args.method][0]
    dataset = _dataset(False, "dmdopt-runs/data")
    model = _problem(False)[1]
    config = _configs(args.method, lr=lr, steps=args.steps, seed=args.seed)
    plain = train(dataset=dataset, model=model, training=config)
    print(f"plain {args.method} lr {lr:g}, {args.steps} steps, seed {args.seed}: final val "
          f"{plain.val_error:.4f}")
    for delays in (0, args.delays):
        # the accelerator imports fit_dmd from dmdopt.dmd at each jump
        dmd_package.fit_dmd = real if delays == 0 else (
            lambda snaps, rank, d=delays: DelayFit(snaps, rank, d, real))
        try:
            result = train(dataset=dataset, model=model, training=config, dmd=DMDConfig())
        finally:
            dmd_package.fit_dmd = real
        reached = result.cost_to_reach(plain.val_error)
        ratio = f"{reached[0] / plain.backprop_equivalent:.3f}x" if reached else "not reached"
        name = "first-order (default)" if delays == 0 else f"time-delay, q = {delays}"
        print(f"  + DMD {name:22s}: final val {result.val_error:.4f}; plain's final error at "
              f"{ratio} its cost; jumps {result.jumps_accepted}/"
              f"{result.jumps_accepted + result.jumps_rejected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sgd_momentum", choices=("adam", "gd", "sgd_momentum"))
    parser.add_argument("--lr", type=float, default=None, help="default: the benchmark's rate")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delays", type=int, default=2)
    parser.add_argument("--exactness-only", action="store_true")
    args = parser.parse_args()
    exactness()
    if not args.exactness_only:
        training(args)


if __name__ == "__main__":  # the dataset build spawns workers
    main()
