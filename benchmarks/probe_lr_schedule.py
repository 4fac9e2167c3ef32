"""Probe: a decaying learning rate, with and without DMD, against constant-lr Adam's cost.

Full-batch Adam on the default problem and model whose learning rate follows a cosine from
`peak` down to 0 over a budget of T steps (the budget is the schedule's length, so each T is
its own run). Plain and DMD (default `DMDConfig`) runs share the schedule; the DMD run's
forward passes and DMD FLOPs are charged by the accelerator, in bpe as in the benchmark.
Prints, per (peak, T, variant), the final validation error and the cost at which the run
first reaches the target (default: constant-lr Adam's median final error at its 2,000-step
budget, 0.0637, README's benchmark table), and that cost over 2,000 bpe.

    python benchmarks/probe_lr_schedule.py [--peaks 3e-3,1e-2] [--budgets 500,750,1000]
                                           [--seed 0] [--target 0.0637] [--jobs 2]

Measured (seed 0, 2026-12-02, 2 cores): see benchmarks/FINDINGS.md, "The goal" (a decaying learning rate).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time


def run(peak: float, budget: int, use_dmd: bool, seed: int, target: float, cache_dir: str) -> dict:
    import torch
    from _probe_setup import default_problem

    from dmdopt.training import DMDConfig
    from dmdopt.training.accelerator import DMDAccelerator
    from dmdopt.training.cost import CostCounter, flops_per_backprop
    from dmdopt.training.loop import evaluate

    torch.set_num_threads(1)
    net, x, _, y_scaled, x_val, y_val = default_problem(seed, cache_dir)
    opt = torch.optim.Adam(net.parameters(), lr=peak)
    cost = CostCounter(flops_per_backprop=flops_per_backprop(sum(p.numel() for p in net.parameters()), len(x)))
    acc = DMDAccelerator(net, opt, DMDConfig(), cost=cost) if use_dmd else None

    @torch.no_grad()
    def train_loss() -> torch.Tensor:
        return ((net.forward_scaled(x) - y_scaled) ** 2).mean()

    reached, t0 = None, time.perf_counter()
    for step in range(budget):
        for group in opt.param_groups:  # cosine from `peak` at step 0 to 0 at step `budget`
            group["lr"] = peak * 0.5 * (1.0 + math.cos(math.pi * step / budget))
        opt.zero_grad(set_to_none=True)
        loss = ((net.forward_scaled(x) - y_scaled) ** 2).mean()
        loss.backward()
        opt.step()
        cost.backprop_steps += 1
        if acc is not None:
            acc.step(train_loss)
        if (step + 1) % 20 == 0 or step + 1 == budget:  # monitoring, not charged
            err = evaluate(net, x_val, y_val)["rel_l2"]
            if reached is None and err <= target:
                reached = cost.backprop_equivalent
    stats = acc.stats if acc is not None else {}
    return {"peak": peak, "budget": budget, "variant": "adam+dmd" if use_dmd else "adam",
            "final": err, "cost": cost.backprop_equivalent, "to_target": reached,
            "jumps": (f"{stats['jumps_accepted']}/{stats['jumps_accepted'] + stats['jumps_rejected']}"
                      if use_dmd else "-"),
            "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peaks", default="3e-3,1e-2")
    ap.add_argument("--budgets", default="500,750,1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.0637)
    ap.add_argument("--full-batch-cost", type=float, default=2000.0,
                    help="constant-lr Adam's cost to the target, in bpe")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache-dir", default="dmdopt-runs/data")
    args = ap.parse_args()

    jobs = [(float(p), int(t), d, args.seed, args.target, args.cache_dir)
            for p in args.peaks.split(",") for t in args.budgets.split(",") for d in (False, True)]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.starmap(run, jobs)
    print(f"cosine-decayed full-batch Adam, seed {args.seed}, target {args.target}")
    print(f"{'peak':>7} {'T':>5} {'variant':<9} {'final err':>9} {'cost':>7} {'to tgt':>7} "
          f"{f'x {args.full_batch_cost:g}':>7} {'jumps':>7} {'wall s':>7}")
    for r in rows:
        hit = r["to_target"]
        print(f"{r['peak']:>7g} {r['budget']:>5} {r['variant']:<9} {r['final']:>9.4f} {r['cost']:>7.0f} "
              f"{'-' if hit is None else f'{hit:.0f}':>7} "
              f"{'-' if hit is None else f'{hit / args.full_batch_cost:.2f}':>7} "
              f"{r['jumps']:>7} {r['wall']:>7.1f}")


if __name__ == "__main__":
    main()
