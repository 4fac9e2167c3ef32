"""An optimiser with and without DMD across learning rates: cost to fixed validation errors.

`dmdopt bench` compares each optimiser with its DMD version at one learning rate, against the
plain run's own final error. This benchmark asks the question a user tuning the learning rate
asks instead: how many backprop-equivalents (bpe) does each pipeline need to reach a fixed
validation error, at each learning rate, and how does the best DMD pipeline compare with the
best plain one? (A ratio at one rate partly measures how far that rate is from its best.)

Default problem and MLP, full batch, one of `dmdopt bench`'s methods (gd = SGD without
momentum, sgd_momentum, adam), default `DMDConfig`, up to `--steps` steps; a run stops once it
reaches the lowest target. Medians over seeds; a target not reached within the budget counts
as infinite ("-"). Costs are exact counts (no timing).

    python benchmarks/bench_lr.py [--method gd] [--lrs 1,2,4,8] [--seeds 3] [--steps 2000]
                                  [--targets 0.30,0.25,0.20,0.17]
    python benchmarks/bench_lr.py --method adam   # lrs 3e-3,5e-3,1e-2; targets down to 0.0637
"""

from __future__ import annotations

import argparse
import math
import statistics

# method: (learning rates, validation-error targets). GD's span its rates 1-8 at 2,000 steps;
# Adam's end at 0.0637, plain Adam's median final error at its tuned 3e-3 (README), the target
# of the goal (any DMD pipeline at <= 0.5x plain Adam's cost to its final error).
DEFAULTS = {
    "gd": ((1.0, 2.0, 4.0, 8.0), (0.30, 0.25, 0.20, 0.17)),
    "sgd_momentum": ((0.5, 1.0, 2.0), (0.20, 0.15, 0.12, 0.11)),
    "adam": ((3e-3, 5e-3, 1e-2), (0.10, 0.08, 0.07, 0.0637)),
}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def run(lrs, seeds, steps, targets, *, method: str = "gd", cache_dir: str = "dmdopt-runs/data") -> list[dict]:
    """One plain and one DMD run per (lr, seed); each row holds the cost to every target."""
    from dataclasses import replace

    from dmdopt.bench import _configs, _dataset, _problem
    from dmdopt.training.config import DMDConfig
    from dmdopt.training.loop import Diverged, train

    dataset = _dataset(False, cache_dir)
    model = _problem(False)[1]
    rows = []
    for lr in lrs:
        for seed in range(seeds):
            for variant in ("plain", "dmd"):
                training = replace(_configs(method, lr=lr, steps=steps, seed=seed),
                                   target_error=min(targets))
                curve: list[dict] = []  # kept when a run diverges: what it reached still counts
                try:
                    train(dataset=dataset, model=model, training=training,
                          dmd=DMDConfig() if variant == "dmd" else None, on_eval=curve.append)
                except Diverged:
                    pass
                costs = {t: next((p["cost"] for p in curve if p["val_error"] <= t), math.inf)
                         for t in targets}
                rows.append({"lr": lr, "seed": seed, "variant": variant, "costs": costs})
                print(f"  {method} lr {lr:g} seed {seed} {variant:5s}: "
                      + "  ".join(f"{t:g}@{_fmt(c)}" for t, c in costs.items()), flush=True)
    return rows


def _fmt(cost: float) -> str:
    return "-" if not math.isfinite(cost) else f"{cost:.0f}"


def _ratio(dmd: float, plain: float) -> str:
    """DMD cost / plain cost, or '-' when either never reached the target (or plain at 0)."""
    if not (math.isfinite(plain) and math.isfinite(dmd)) or plain <= 0:
        return "-"
    return f"{dmd / plain:.2f}x"


def table(rows: list[dict], targets) -> str:
    """Median cost to each target per (lr, variant), then the best plain against the best DMD."""
    def median(lr, variant, t):
        return statistics.median(r["costs"][t] for r in rows if r["lr"] == lr and r["variant"] == variant)

    lrs = sorted({r["lr"] for r in rows})
    head = " ".join(f"{'to ' + format(t, 'g'):>8s}" for t in targets)
    lines = [f"{'lr':>5s} {'variant':9s} {head}", "-" * (15 + 9 * len(targets))]
    best = {v: {t: math.inf for t in targets} for v in ("plain", "dmd")}
    for lr in lrs:
        for variant in ("plain", "dmd"):
            cells = []
            for t in targets:
                cost = median(lr, variant, t)
                best[variant][t] = min(best[variant][t], cost)
                cells.append(f"{_fmt(cost):>8s}")
            lines.append(f"{lr:5g} {variant:9s} " + " ".join(cells))
        cells = [f"{_ratio(median(lr, 'dmd', t), median(lr, 'plain', t)):>8s}" for t in targets]
        lines.append(f"{'':5s} {'dmd/plain':9s} " + " ".join(cells))
    lines.append("-" * (15 + 9 * len(targets)))
    cells = [f"{_ratio(best['dmd'][t], best['plain'][t]):>8s}" for t in targets]
    lines.append(f"{'best':>5s} {'dmd/plain':9s} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(DEFAULTS), default="gd")
    parser.add_argument("--lrs", type=_floats, help="default: per method, see DEFAULTS")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--targets", type=_floats, help="default: per method, see DEFAULTS")
    args = parser.parse_args()
    lrs = args.lrs or DEFAULTS[args.method][0]
    targets = args.targets or DEFAULTS[args.method][1]
    rows = run(lrs, args.seeds, args.steps, targets, method=args.method)
    print(table(rows, targets))


if __name__ == "__main__":  # the dataset build spawns workers
    main()
