"""Probe: does an exact least-squares output layer (variable projection) speed Adam up?

94% of the default regressor's parameters (128 x 4096 + 4096 of 562,304) sit in its last,
linear layer, and for fixed hidden features the training loss is an ordinary least-squares
problem in them. This probe runs plain full-batch Adam on the default problem and every
`--every` steps replaces the output layer by the least-squares fit on the current features
(ridge `--ridge` x trace/129, float64 normal equations). The refit's cost is charged in
backprop-equivalent steps (bpe) by its FLOPs: one forward through the hidden layers, the
(129 x 129) Gram and the (129 x 4096) right-hand side, over 6 x parameters x rows per bpe.

Diagnostic only. Prints the validation and training errors and the output layer's Frobenius
norm every 100 bpe, and the bpe at which the validation error first reaches `--target`
(default: plain Adam's median final error at its 2,000-step budget, 0.0637).

Measured (seed 0, 400 steps, 2026-12-02): plain 0.1024; one refit at the end 0.0981 (training
error 0.0845 -> 0.0671); a refit every 20 steps 0.380 (ridge 1e-6; the head's norm grows
from 72 to 3,000: the features are nearly collinear and the exact fit leans on their small
differences, which the next Adam steps destroy) and 0.131 (ridge 1e-2). Not a lever.

    python benchmarks/probe_lstsq_head.py [--every 20] [--steps 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from _probe_setup import default_problem

    from dmdopt.training.loop import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="Adam steps")
    ap.add_argument("--every", type=int, default=20, help="refit the head every N steps (0: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ridge", type=float, default=1e-6)
    ap.add_argument("--reset-moments", action="store_true",
                    help="clear Adam's moments of the output layer after a refit")
    ap.add_argument("--target", type=float, default=0.0637, help="validation error to reach")
    ap.add_argument("--cache-dir", default="dmdopt-runs/data")
    args = ap.parse_args()

    net, x, y, y_scaled, x_val, y_val = default_problem(args.seed, args.cache_dir)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    head = net.net[-1]
    body = net.net[:-1]
    n_rows, n_out = y_scaled.shape
    n_feat = head.in_features + 1
    n_params = sum(p.numel() for p in net.parameters())
    bpe_flops = 6.0 * n_params * n_rows
    body_params = sum(p.numel() for p in body.parameters())
    refit_flops = (2.0 * body_params * n_rows + 2.0 * n_rows * n_feat ** 2
                   + 2.0 * n_rows * n_feat * n_out + n_feat ** 3 / 3 + 2.0 * n_feat ** 2 * n_out)
    refit_bpe = refit_flops / bpe_flops
    print(f"one refit = {refit_bpe:.3f} bpe")

    @torch.no_grad()
    def refit() -> None:
        h = body((x - net.x_mean) / net.x_std).double()
        h = torch.cat([h, torch.ones(n_rows, 1, dtype=h.dtype)], dim=1)
        gram = h.T @ h
        gram += args.ridge * gram.trace() / n_feat * torch.eye(n_feat, dtype=h.dtype)
        w = torch.linalg.solve(gram, h.T @ y_scaled.double())  # (n_feat, n_out)
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
        if args.reset_moments:
            for p in (head.weight, head.bias):
                opt.state[p]["exp_avg"].zero_()
                opt.state[p]["exp_avg_sq"].zero_()

    cost, reached, next_print = 0.0, None, 0.0
    t0 = time.perf_counter()
    print(f"{'step':>6} {'bpe':>8} {'val err':>8} {'train':>8} {'|head|':>8} {'wall s':>7}")
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((net.forward_scaled(x) - y_scaled) ** 2).mean()
        loss.backward()
        opt.step()
        cost += 1.0
        if args.every and step % args.every == 0:
            refit()
            cost += refit_bpe
        if step % 10 == 0 or step == args.steps:
            err = evaluate(net, x_val, y_val)["rel_l2"]
            tr_err = evaluate(net, x, y)["rel_l2"]
            if reached is None and err <= args.target:
                reached = cost
            if cost >= next_print:
                print(f"{step:>6} {cost:>8.1f} {err:>8.4f} {tr_err:>8.4f} {float(head.weight.norm()):>8.2f} {time.perf_counter() - t0:>7.1f}",
                      flush=True)
                next_print += 100
    print(f"final: {cost:.0f} bpe, val error {err:.4f}; target {args.target} first reached at "
          f"{f'{reached:.0f}' if reached is not None else '-'} bpe (resolution: 10 steps)")


if __name__ == "__main__":
    main()
