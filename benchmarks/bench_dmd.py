"""Plain vs DMD-accelerated training (Adam, GD, SGD+momentum), side by side.

Run: ``python benchmarks/bench_dmd.py [--seeds 3] [--steps N] [--quick] [--json PATH]``
(same as ``dmdopt bench``). See `dmdopt.bench` for what is measured.
"""

from __future__ import annotations

from dmdopt.bench import main

if __name__ == "__main__":  # the dataset build spawns workers
    main()
