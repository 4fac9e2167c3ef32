"""Tiny study files for tests (a module of its own: `conftest` names clash across folders)."""

from __future__ import annotations


def tiny_study_toml(name: str = "tiny", *, n_trials: int = 3, extra: str = "",
                    training: str = 'optimizer = "adam"\nlr = 0.01\nmax_steps = 60\neval_every = 10',
                    search: str = "") -> str:
    return f"""
[study]
name = "{name}"
n_trials = {n_trials}
sampler = "random"
seed = 0
{extra}

[problem]
grid = 16
n_samples = 60

[model]
width = 16
depth = 2

[training]
{training}

[search.window]
low = 5
high = 12

[search.rank]
low = 1
high = 6

[search.horizon]
low = 5.0
high = 200.0
include_inf = true
{search}
"""
