"""Solver throughput and dataset build/load times.

Run: ``python benchmarks/bench_solver.py [--workers 2] [--samples 2048]``.
Target: the default dataset (2048 fields at 64²) builds in < 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import numpy as np

from dmdopt.problem import ProblemConfig, load_dataset, solve_field
from dmdopt.problem.config import PARAM_NAMES
from dmdopt.problem.sampling import sample_params


def _median_solve_time(grid: int, repeats: int) -> float:
    # drawn from a config large enough to be valid (a few samples leave a split empty)
    rows = sample_params(ProblemConfig(n_samples=max(repeats, 10), seed=123))[:repeats]
    times = []
    for row in rows:
        kw = dict(zip(PARAM_NAMES, row.tolist(), strict=True))
        t0 = time.perf_counter()
        solve_field(**kw, grid=grid, source_width=0.1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15, help="solves per grid size")
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    for grid in (64, 128):
        t = _median_solve_time(grid, args.repeats)
        rows.append(
            (
                f"solve {grid}x{grid} (median of {args.repeats})",
                f"{t * 1e3:.1f} ms = {1 / t:.0f} solves/s",
            )
        )

    config = dataclasses.replace(ProblemConfig(), n_samples=args.samples)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        ds = load_dataset(config, cache_dir=cache_dir, workers=args.workers, progress=False)
        build = time.perf_counter() - t0
        size_mb = ds.path.stat().st_size / 2**20 if ds.path else float("nan")
        loads = []
        for _ in range(5):
            t0 = time.perf_counter()
            again = load_dataset(config, cache_dir=cache_dir, progress=False)
            loads.append(time.perf_counter() - t0)
        assert np.array_equal(again.fields, ds.fields)
    rows.append(
        (f"build {args.samples} x {config.grid}² (workers={args.workers})", f"{build:.1f} s")
    )
    rows.append(
        (f"cache load ({size_mb:.0f} MiB, median of 5)", f"{statistics.median(loads) * 1e3:.0f} ms")
    )

    width = max(len(k) for k, _ in rows)
    print(f"{'benchmark':<{width}}  result")
    print("-" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
