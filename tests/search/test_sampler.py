"""Per-trial seeding: workers sharing a study file draw different settings, one worker repeats."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution

from dmdopt.search.sampler import TrialSeededSampler, trial_seed

SPACE = {"window": IntDistribution(5, 60, log=True), "rank": IntDistribution(1, 16),
         "horizon": FloatDistribution(2.0, 200.0, log=True)}
FACTORIES = {
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=2),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=4),
}


def _objective(params):
    return [params["window"] / params["rank"], params["horizon"]]


def _two_workers(tmp_path, factory, n=8):
    """Two workers of one SQLite study, each with its own sampler built from the same seed,
    asking in turn (as two processes starting together do) before either tells."""
    storage = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    workers = [optuna.load_study(study_name="s", storage=storage,
                                 sampler=TrialSeededSampler(factory, 0)) for _ in range(2)]
    for _ in range(n // 2):
        asked = [(w, w.ask(SPACE)) for w in workers]
        for w, trial in asked:
            w.tell(trial, _objective(trial.params))
    return [t.params for t in workers[0].get_trials(deepcopy=False)]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_workers_with_one_seed_draw_different_settings(tmp_path, name):
    params = _two_workers(tmp_path, FACTORIES[name])
    assert params[0] != params[1] and params[2] != params[3]
    assert len({tuple(sorted(p.items())) for p in params}) == len(params)


def test_one_seed_one_sequence(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _two_workers(tmp_path / "a", FACTORIES["tpe"]) == _two_workers(tmp_path / "b", FACTORIES["tpe"])


def test_a_worker_seeded_once_would_repeat_its_twin():
    """What the wrapper prevents: two samplers from one seed propose the same first trial."""
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
        draws.append(study.ask(SPACE).params)
    assert draws[0] == draws[1]


def test_trial_seeds_differ_by_number_and_seed():
    seeds = {trial_seed(s, n) for s in (0, 1) for n in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)


def test_nsga2_population_follows_the_n_trials_the_study_was_created_with(tmp_path, monkeypatch):
    """A resume may raise `n_trials` (the config digest ignores it) and `--n-trials` may
    override the file's: the generations keep the population the study was created with."""
    from study_files import tiny_study_toml

    from dmdopt.search import load_study_file
    from dmdopt.search.study import prepare_study, study_sampler

    monkeypatch.chdir(tmp_path)  # the embedded storage, dmdopt-runs/optuna.db, goes here

    def config_with(n_trials: int):
        path = tmp_path / f"s{n_trials}.toml"
        path.write_text(tiny_study_toml(n_trials=n_trials).replace('sampler = "random"',
                                                                   'sampler = "nsga2"'))
        return load_study_file(path)

    created = config_with(40)
    study, _ = prepare_study(created, storage_url=created.storage, progress=False,
                             echo=lambda *_: None, n_trials=8)
    assert study.user_attrs["nsga2_population"] == 4  # from --n-trials 8, not the file's 40
    resumed = config_with(64)  # the same study, a larger n_trials in its file
    assert study_sampler(study, resumed)._factory(0).population_size == 4
    study.set_user_attr("nsga2_population", None)  # a study from before the attribute:
    assert study_sampler(study, resumed)._factory(0).population_size == 10  # its file's 40
