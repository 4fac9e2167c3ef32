"""The study's sampler, seeded per trial so that concurrent workers never draw alike.

Every worker -- a process of `--workers N` or a `dmdopt study run` on another machine -- builds
its sampler from the same study file, hence with the same seed. Seeded once per worker, their
random streams coincide: two workers starting together propose the same settings and train
them twice (measured: trials 0/1 and 2/3 of a two-worker TPE study were identical pairs).
`TrialSeededSampler` gives every trial a fresh inner sampler seeded with (study seed, trial
number). The storage hands out trial numbers, so they are unique across all workers, and a
one-worker study stays reproducible run for run. TPE and NSGA-II read the history (and
NSGA-II its generations) from the storage each time; GP loses only its warm start of the
kernel parameters (Optuna caches them on the instance), so each fit starts cold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from dmdopt.search.config import StudyConfig

_KEEP = 64  # inner samplers kept for trials still running in this process


def trial_seed(seed: int, number: int) -> int:
    """A well-mixed 32-bit seed for trial `number` of a study seeded with `seed`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """Delegates every call about a trial to `factory(trial_seed(seed, trial.number))`."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._inner: OrderedDict[int, BaseSampler] = OrderedDict()

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        sampler = self._inner.get(trial.number)
        if sampler is None:
            sampler = self._inner[trial.number] = self._factory(trial_seed(self._seed, trial.number))
            while len(self._inner) > _KEEP:
                self._inner.popitem(last=False)
        return sampler

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._inner.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to reseed: each trial's stream is fixed by its number (Optuna calls this for
        thread workers, which trial numbers already tell apart)."""


def nsga2_population(n_trials: int | None) -> int:
    """NSGA-II's population for a study of `n_trials` trials: a quarter of it, 4..16 (8 for a
    study bounded by time only). A study stores the value it was created with (user attribute
    `nsga2_population`) so that every resume and worker keeps the same generations."""
    return max(4, min(16, (n_trials or 32) // 4))


def _inner_factory(config: StudyConfig, population: int | None) -> Callable[[int], BaseSampler]:
    if config.sampler == "random":
        return lambda seed: optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "tpe":
        return lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)
    if config.sampler == "gp":
        return lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=6)
    size = population or nsga2_population(config.n_trials)
    return lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=size)


def make_sampler(config: StudyConfig, *, population: int | None = None) -> BaseSampler:
    """The sampler named in `[study] sampler`, seeded per trial from `[study] seed`.

    `population` is NSGA-II's (default: `nsga2_population` of the file's `n_trials`); pass the
    value the study was created with, so that a resume with another `n_trials` (the config
    digest ignores it, and `--n-trials` may override it) keeps the generations already run."""
    return TrialSeededSampler(_inner_factory(config, population), config.seed)
