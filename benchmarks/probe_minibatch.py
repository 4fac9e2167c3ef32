"""Probe: mini-batch Adam, with and without DMD, against full-batch Adam's cost to its error.

`dmdopt.training` counts cost in backprop steps *of the configured batch*. To compare a
mini-batch run with the full-batch benchmark, this probe rescales its cost by
batch rows / training rows ("full-batch equivalents", the same FLOPs unit as the benchmark's
bpe). The DMD run uses the default `DMDConfig`; its accept test is a forward pass over
`--accept-rows` training rows (`TrainConfig.accept_rows`: a fixed subset; 0 = all of them,
the default before that option existed), charged as such. Each run stops at the target.
Runs the (batch, seed, plain|dmd) runs in two processes, one thread each.

    python benchmarks/probe_minibatch.py [--batch-sizes 512,256] [--accept-rows B]
                                         [--seeds 3] [--lr 3e-3] [--target 0.0637]

`--accept-rows B` (the default) uses as many rows as a batch. Measured (2026-12-02, 2 idle
cores): see benchmarks/FINDINGS.md, "The goal".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics


def run(job: dict) -> dict:
    import torch

    from dmdopt.problem import ProblemConfig, load_dataset
    from dmdopt.training import DMDConfig, TrainConfig, train

    torch.set_num_threads(1)
    dataset = load_dataset(ProblemConfig(), cache_dir=job["cache_dir"], progress=False)
    n_train = len(dataset.split("train")[0])
    batch = job["batch"]
    scale = batch / n_train
    accept = None if job["accept"] == 0 else job["accept"]
    steps = int(job["full_batch_cost"] * 4 / scale)  # room to reach the target at up to 4x
    result = train(dataset=dataset, dmd=DMDConfig() if job["dmd"] else None,
                   training=TrainConfig(optimizer="adam", lr=job["lr"], batch_size=batch,
                                        accept_rows=accept, max_steps=steps, eval_every=20,
                                        target_error=job["target"], seed=job["seed"]))
    hit = result.cost_to_reach(job["target"])
    return job | {"to_target": None if hit is None else hit[0] * scale,
                  "steps": result.cost["backprop_steps"], "wall": result.wall_time,
                  "jumps": (result.jumps_accepted, result.jumps_accepted + result.jumps_rejected)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="512,256")
    ap.add_argument("--accept-rows", default="B",
                    help="rows of the DMD accept test: a number, 0 = all, B = the batch size")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target", type=float, default=0.0637,
                    help="full-batch Adam's median final error at 2,000 steps (README)")
    ap.add_argument("--full-batch-cost", type=float, default=2000.0,
                    help="full-batch Adam's cost to that error, in bpe")
    ap.add_argument("--cache-dir", default="dmdopt-runs/data")
    args = ap.parse_args()

    batches = [int(b) for b in args.batch_sizes.split(",")]
    jobs = [{"batch": b, "seed": s, "dmd": d, "lr": args.lr, "target": args.target,
             "accept": b if args.accept_rows == "B" else int(args.accept_rows),
             "full_batch_cost": args.full_batch_cost, "cache_dir": args.cache_dir}
            for b in batches for s in range(args.seeds) for d in (False, True)]
    with mp.get_context("spawn").Pool(2) as pool:
        rows = pool.map(run, jobs, chunksize=1)

    print(f"Adam lr {args.lr}, target {args.target}; costs in full-batch backprop equivalents; "
          f"x full = cost / {args.full_batch_cost:.0f} (full-batch Adam's)")
    print(f"{'batch':>5} {'accept':>6} {'seed':>4} {'variant':<8} {'steps':>6} {'to tgt':>7} "
          f"{'x full':>7} {'jumps':>8} {'wall s':>7}")
    for r in rows:
        hit = r["to_target"]
        to_tgt = "-" if hit is None else f"{hit:.0f}"
        ratio = "-" if hit is None else f"{hit / args.full_batch_cost:.3f}"
        jumps = "{}/{}".format(*r["jumps"]) if r["dmd"] else "-"
        accept = r["accept"] if r["dmd"] else "-"
        variant = "adam+dmd" if r["dmd"] else "adam"
        print(f"{r['batch']:>5} {accept:>6} {r['seed']:>4} {variant:<8} {r['steps']:>6} "
              f"{to_tgt:>7} {ratio:>7} {jumps:>8} {r['wall']:>7.1f}")
    print("medians over seeds (a run that missed the target counts as infinite):")
    for b in batches:
        med = {}
        for d in (False, True):
            costs = [r["to_target"] if r["to_target"] is not None else float("inf")
                     for r in rows if r["batch"] == b and r["dmd"] == d]
            med[d] = statistics.median(costs)
        ratios = [dm["to_target"] / pl["to_target"] for pl, dm in zip(
            [r for r in rows if r["batch"] == b and not r["dmd"]],
            [r for r in rows if r["batch"] == b and r["dmd"]], strict=True)
            if pl["to_target"] and dm["to_target"]]
        per_seed = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"  batch {b}: adam {med[False]:.0f} ({med[False] / args.full_batch_cost:.3f}x full), "
              f"adam+dmd {med[True]:.0f} ({med[True] / args.full_batch_cost:.3f}x full); "
              f"dmd / plain per seed: {per_seed}")


if __name__ == "__main__":
    main()
