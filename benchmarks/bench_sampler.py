"""Sampler efficiency: hypervolume of the front after N trials, default sampler vs random search.

On the quick problem (studies/quick.toml), >= 3 seeds. Every study uses the same reference run
(same problem, optimiser, budget, seed) and so the same hypervolume reference point
(1.5 x the reference's cost and error), computed with Optuna's own routine. The goal: the
default sampler (NSGA-II) reaches random search's 2N-trial hypervolume in N trials.

    python benchmarks/bench_sampler.py [--trials N] [--seeds 3] [--samplers nsga2,tpe]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path


def hv_after(study, n: int) -> float:
    """Hypervolume of the front of the first n completed trials (the study's own history)."""
    from dmdopt.search.summary import hypervolume_history, hypervolume_reference_point

    history = hypervolume_history(study.get_trials(deepcopy=False),
                                  hypervolume_reference_point(study))
    return history[min(n, len(history)) - 1][1] if history else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="N")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="nsga2,tpe", help="compared with random")
    parser.add_argument("--study", default=str(Path(__file__).parents[1] / "studies" / "quick.toml"))
    args = parser.parse_args()

    from dmdopt.search import load_study_file, run_study

    base = load_study_file(args.study)
    n = args.trials
    work = Path(tempfile.mkdtemp(prefix="dmdopt-bench-sampler-"))
    storage = f"sqlite:///{work}/optuna.db"
    rows = []
    samplers = ["random"] + [s for s in args.samplers.split(",") if s and s != "random"]
    for sampler in samplers:
        budget = 2 * n if sampler == "random" else n
        for seed in range(args.seeds):
            name = f"bench-{sampler}-{seed}"
            cfg = replace(base, name=name, sampler=sampler, seed=seed, n_trials=budget,
                          raw=base.raw | {"study": base.raw["study"] | {"name": name, "sampler": sampler, "seed": seed}})
            study = run_study(cfg, storage=storage, tracking=False, progress=False,
                              cache_dir=work / "data", echo=lambda *_: None)
            row = {"sampler": sampler, "seed": seed, "hv_n": hv_after(study, n)}
            if sampler == "random":
                row["hv_2n"] = hv_after(study, 2 * n)
            rows.append(row)
            print(f"  {sampler:>7} seed {seed}: HV@{n} {row['hv_n']:.3f}"
                  + (f"  HV@{2 * n} {row['hv_2n']:.3f}" if "hv_2n" in row else ""), flush=True)

    rand_2n = statistics.median(r["hv_2n"] for r in rows if r["sampler"] == "random")
    print(f"\nHypervolume after N={n} trials (median of {args.seeds} seeds; reference point 1.5 x "
          "the plain-training reference's cost and error)")
    print(f"{'sampler':>8} {'HV@N':>8} {'HV@2N':>8} {'HV@N / random HV@2N':>22}")
    for sampler in samplers:
        hv_n = statistics.median(r["hv_n"] for r in rows if r["sampler"] == sampler)
        hv_2n = rand_2n if sampler == "random" else float("nan")
        print(f"{sampler:>8} {hv_n:8.3f} {hv_2n:8.3f} {hv_n / rand_2n if rand_2n else float('nan'):22.3f}")


if __name__ == "__main__":
    main()
