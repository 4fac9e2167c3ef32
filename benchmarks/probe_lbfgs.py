"""Probe: is a stronger base optimiser the lever for the goal (plain Adam's error at <= 0.5x)?

Plain full-batch L-BFGS (`torch.optim.LBFGS`, strong-Wolfe line search) on the default problem
and model, one seed. Each closure evaluation is one forward + backward over the training set,
i.e. one backprop-equivalent step (bpe) in `dmdopt.training.cost`'s units; L-BFGS's own vector
work (two-loop recursion over `history` pairs) is not charged, which flatters it. The
validation error is printed about every 100 evaluations, then the evaluations at which it first
reaches the given target (default: plain Adam's median final error at its 2,000-step budget,
0.0637 in README's benchmark table).

Diagnostic only (not part of `dmdopt bench`); about 3-4 min per 1,000 evaluations on 2 idle
CPU cores.

    python benchmarks/probe_lbfgs.py [--evals 2000] [--seed 0] [--history 20] [--target 0.0637]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from _probe_setup import default_problem

    from dmdopt.training.loop import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=2000, help="budget in closure evaluations (bpe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--history", type=int, default=20, help="L-BFGS history size")
    ap.add_argument("--target", type=float, default=0.0637, help="validation error to reach")
    ap.add_argument("--cache-dir", default="dmdopt-runs/data")
    args = ap.parse_args()

    net, x, y, y_scaled, x_val, y_val = default_problem(args.seed, args.cache_dir)
    opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=20, history_size=args.history,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    evals = 0

    def closure() -> torch.Tensor:
        nonlocal evals
        opt.zero_grad()
        loss = ((net.forward_scaled(x) - y_scaled) ** 2).mean()
        loss.backward()
        evals += 1
        return loss

    t0, next_print, reached = time.perf_counter(), 0, None
    print(f"{'evals':>6} {'val err':>8} {'wall s':>7}")
    while evals < args.evals:
        opt.step(closure)  # up to 20 iterations, each 1+ evaluations
        err = evaluate(net, x_val, y_val)["rel_l2"]
        if reached is None and err <= args.target:
            reached = evals
        if evals >= next_print:
            print(f"{evals:>6} {err:>8.4f} {time.perf_counter() - t0:>7.1f}", flush=True)
            next_print += 100
    print(f"final: {evals} evaluations, val error {err:.4f}; target {args.target} first reached "
          f"at {reached if reached is not None else '-'} evaluations (resolution: one L-BFGS step)")


if __name__ == "__main__":
    main()
