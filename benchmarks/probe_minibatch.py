"""Probe: mini-batch Adam, with and without DMD, against full-batch Adam's cost to its error.

`dmdopt.training` counts cost in backprop steps *of the configured batch*. To compare a
mini-batch run with the full-batch benchmark, this probe rescales its cost by
batch rows / training rows ("full-batch equivalents", the same FLOPs unit as the benchmark's
bpe). The DMD run uses the default `DMDConfig`; its accept test is a forward pass over the
whole training set, charged as such. Runs plain and DMD in two processes, one thread each.

    python benchmarks/probe_minibatch.py [--batch-size 512] [--steps 4000] [--lr 3e-3]
                                         [--seed 0] [--target 0.0637]

Measured (seed 0, 2026-12-02, 2 idle cores, about 4 min): see README, "The goal".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp


def run(args: argparse.Namespace, use_dmd: bool) -> dict:
    import torch

    from dmdopt.problem import ProblemConfig, load_dataset
    from dmdopt.training import DMDConfig, TrainConfig, train

    torch.set_num_threads(1)
    dataset = load_dataset(ProblemConfig(), cache_dir=args.cache_dir, progress=False)
    scale = args.batch_size / len(dataset.split("train")[0])
    result = train(dataset=dataset, dmd=DMDConfig() if use_dmd else None,
                   training=TrainConfig(optimizer="adam", lr=args.lr, batch_size=args.batch_size,
                                        max_steps=args.steps, eval_every=20, seed=args.seed))
    hit = result.cost_to_reach(args.target)
    return {"variant": "adam+dmd" if use_dmd else "adam", "final": result.val_error,
            "cost": result.backprop_equivalent * scale,
            "to_target": None if hit is None else hit[0] * scale,
            "jumps": f"{result.jumps_accepted}/{result.jumps_accepted + result.jumps_rejected}",
            "wall": result.wall_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.0637,
                    help="full-batch Adam's median final error at 2,000 steps (README)")
    ap.add_argument("--full-batch-cost", type=float, default=2000.0,
                    help="full-batch Adam's cost to that error, in bpe")
    ap.add_argument("--cache-dir", default="dmdopt-runs/data")
    args = ap.parse_args()

    with mp.get_context("spawn").Pool(2) as pool:
        rows = pool.starmap(run, [(args, False), (args, True)])
    print(f"batch {args.batch_size}, lr {args.lr}, {args.steps} steps, seed {args.seed}; "
          "costs in full-batch backprop equivalents")
    print(f"{'variant':<9} {'final err':>9} {'cost':>7} {'to tgt':>7} {'x full':>7} "
          f"{'jumps':>8} {'wall s':>7}")
    for r in rows:
        ratio = "-" if r["to_target"] is None else f"{r['to_target'] / args.full_batch_cost:.2f}"
        to_tgt = "-" if r["to_target"] is None else f"{r['to_target']:.0f}"
        print(f"{r['variant']:<9} {r['final']:>9.4f} {r['cost']:>7.0f} {to_tgt:>7} {ratio:>7} "
              f"{r['jumps']:>8} {r['wall']:>7.1f}")


if __name__ == "__main__":
    main()
