"""Tuned configs: export -> load round trips in every format, and every bad file is one clear line."""

from __future__ import annotations

import json
import math
import os
import stat
import tomllib
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from dmdopt.errors import UserError
from dmdopt.export import export_tuned_config, load_tuned_config, tuned_config_from_summary
from dmdopt.model import ModelConfig
from dmdopt.problem import ProblemConfig
from dmdopt.training.config import DMDConfig, TrainConfig

PROBLEM = {"grid": 16, "n_samples": 60, "seed": 3, "diffusivity": [0.02, 0.08]}
MODEL = {"width": 16, "depth": 2, "activation": "gelu"}


def make_trial(number: int, cost: float, err: float, *, window: int = 12, rank=5,
               horizon=math.inf, state: str = "COMPLETE") -> dict:
    dmd = DMDConfig(window=window, rank=rank, horizon=horizon, line_search=(1.0, 0.5),
                    optimizer_state="reset").to_dict()
    training = TrainConfig(lr=3e-4, max_steps=40, eval_every=10, seed=7, device="cpu").to_dict()
    return {
        "number": number, "state": state,
        "params": {"window": window, "rank": rank, "horizon": dmd["horizon"]},
        "values": [cost, err] if state == "COMPLETE" else None,
        "user_attrs": {"cost_total": cost * 1.5, "cost_to_reference": cost,
                       "reached_reference": True, "val_error": err,
                       "test_error": err * 1.1, "speedup": 600.0 / cost, "device": "cpu",
                       "cpu_threads": 3, "cpu_capability": "AVX2",
                       "training": training, "dmd": dmd},
        "datetime_start": "2024-01-01T00:00:00", "datetime_complete": "2024-01-01T00:01:00",
    }


@pytest.fixture
def summary() -> dict:
    trials = [make_trial(0, 50.0, 0.30, window=5, rank=3, horizon=50.0),
              make_trial(1, 100.0, 0.10, window=8, rank=0.99),
              make_trial(2, 150.0, 0.05),
              make_trial(3, 400.0, 0.04, window=20, rank=0, horizon=10.0),
              make_trial(4, 1.0, 1.0, state="FAIL")]
    return {
        "study_name": "quick", "metric_names": ["cost_bpe", "val_rel_l2"],
        "storage": "postgresql://alice:s3cret@db.example/optuna",
        "config": {"study": {"name": "quick"}, "problem": PROBLEM, "model": MODEL,
                   "training": {"max_steps": 40}},
        "reference": {"cost_bpe": 600.0, "val_rel_l2": 0.08, "test_rel_l2": 0.081,
                      "cost_total": 600.0, "wall_time": 1.0, "curve": []},
        "trials": trials, "pareto": [0, 1, 2, 3], "recommended": None,
        "hypervolume_history": [], "hypervolume_reference_point": [990.0, 0.132],
    }


def test_exported_file_is_readable_like_any_file_the_user_writes(summary, tmp_path):
    """The atomic write goes through mkstemp (owner-only); the result must not stay private,
    or the production job of another user or service cannot read it."""
    old = os.umask(0o022)
    os.umask(old)
    path = tmp_path / "tuned.toml"
    export_tuned_config(summary, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old
    assert not list(tmp_path.glob(".tuned.toml.*"))  # no temporary left behind


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml", ".yml"])
def test_round_trip_keeps_every_setting(summary, tmp_path, suffix):
    path = tmp_path / f"tuned{suffix}"
    # the reference reached its final error early: the stricter ratio is exported beside
    summary["trials"][2]["user_attrs"]["speedup_first_passage"] = 1.5
    tuned = export_tuned_config(summary, path)
    loaded = load_tuned_config(path)
    trial = summary["trials"][2]  # the knee of the front
    assert loaded == tuned
    assert loaded.dmd == DMDConfig.from_dict(trial["user_attrs"]["dmd"])
    assert math.isinf(loaded.dmd.horizon) and loaded.dmd.line_search == (1.0, 0.5)
    assert loaded.expected["device"] == "cpu" and loaded.expected["cpu_threads"] == 3
    assert loaded.expected["cpu_capability"] == "AVX2"
    assert loaded.training == TrainConfig.from_dict(trial["user_attrs"]["training"])
    assert loaded.training.batch_size is None and loaded.training.target_error is None
    assert loaded.model == ModelConfig(width=16, depth=2, activation="gelu")
    assert loaded.problem == ProblemConfig.from_dict(PROBLEM)
    prov = loaded.provenance
    assert prov["study_name"] == "quick" and prov["trial_number"] == 2 and prov["policy"] == "knee"
    assert prov["storage"] == "postgresql://alice:***@db.example/optuna"
    assert prov["dataset_hash"] == ProblemConfig.from_dict(PROBLEM).config_hash()
    assert "torch" in prov["versions"] and "dmdopt" in prov["versions"]
    assert datetime.fromisoformat(prov["created_at"]).utcoffset().total_seconds() == 0
    assert loaded.expected == {"cost_bpe": 150.0, "cost_total": 225.0, "cost_to_reference": 150.0,
                               "reference_val_rel_l2": 0.08, "val_rel_l2": 0.05,
                               "test_rel_l2": pytest.approx(0.055), "speedup": 4.0,
                               "speedup_first_passage": 1.5, "device": "cpu", "cpu_threads": 3, "cpu_capability": "AVX2",
                               "max_steps": loaded.training.max_steps,
                               "settings_hash": loaded.settings_hash()}  # what they were at
    text = path.read_text()
    assert "s3cret" not in text
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_toml_is_readable_by_tomllib_with_inf_as_a_string(summary, tmp_path):
    path = tmp_path / "tuned.toml"
    export_tuned_config(summary, path)
    data = tomllib.loads(path.read_text())
    assert data["schema_version"] == 1
    assert data["dmd"]["horizon"] == "inf"
    assert data["problem"]["diffusivity"] == [0.02, 0.08]
    assert set(data) == {"schema_version", "dmd", "training", "model", "problem", "provenance",
                         "expected"}


def test_policies_and_an_explicit_trial_choose_the_exported_trial(summary, tmp_path):
    path = tmp_path / "tuned.json"
    tuned = export_tuned_config(summary, path, policy="budget", value=120)
    assert tuned.provenance["trial_number"] == 1 and tuned.provenance["policy"] == "budget=120"
    assert tuned.dmd.rank == 0.99  # an energy fraction survives as a float
    tuned = export_tuned_config(summary, path, policy="max-error-ratio=0.6")  # 0.6 x 0.08
    assert tuned.provenance["trial_number"] == 3 and tuned.dmd.rank == 0
    tuned = export_tuned_config(summary, path, number=0)
    assert tuned.provenance["policy"] == "manual" and tuned.dmd.horizon == 50.0
    assert load_tuned_config(path).dmd.window == 5


def test_export_refusals_leave_the_destination_alone(summary, tmp_path):
    path = tmp_path / "tuned.toml"
    export_tuned_config(summary, path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="trial 4 is FAIL"):
        export_tuned_config(summary, path, number=4)
    with pytest.raises(UserError, match="no trial 99"):
        export_tuned_config(summary, path, number=99)
    with pytest.raises(UserError, match="budget=10"):
        export_tuned_config(summary, path, policy="budget=10")
    summary["trials"][2]["user_attrs"]["dmd"]["rank"] = 50  # > window - 2
    with pytest.raises(UserError, match="dmd.rank"):
        export_tuned_config(summary, path)
    assert path.read_bytes() == before
    with pytest.raises(UserError, match=r"\.ini"):
        export_tuned_config(summary, tmp_path / "tuned.ini")
    assert not (tmp_path / "tuned.ini").exists()


def test_unwritable_destination_is_a_user_error_naming_the_path(summary, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    target = blocker / "sub" / "tuned.toml"
    with pytest.raises(UserError) as info:
        export_tuned_config(summary, target)
    assert str(target) in str(info.value)
    assert blocker.read_text() == "not a directory"


# ------------------------------------------------------------------------------------------
# reading bad files


@pytest.fixture
def good(summary, tmp_path) -> dict:
    path = tmp_path / "good.json"
    export_tuned_config(summary, path)
    return json.loads(path.read_text())


def test_expected_names_the_references_error_and_the_trials_cost_to_it(good, summary, tmp_path):
    """Production reports its own cost to plain training's error from these two figures."""
    assert good["expected"]["reference_val_rel_l2"] == 0.08
    assert good["expected"]["cost_to_reference"] == good["expected"]["cost_bpe"]
    assert load_tuned_config(_write_json(tmp_path, good)).expected["reference_val_rel_l2"] == 0.08
    for trial in summary["trials"]:  # a trial that never reached it: no cost to it
        trial["user_attrs"]["reached_reference"] = False
    assert "cost_to_reference" not in tuned_config_from_summary(summary, number=2).expected


def _write_json(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _set(data: dict, dotted: str, value) -> dict:
    section, _, key = dotted.partition(".")
    if key:
        data[section][key] = value
    else:
        data[section] = value
    return data


def _drop(data: dict, dotted: str) -> dict:
    section, _, key = dotted.partition(".")
    if key:
        del data[section][key]
    else:
        del data[section]
    return data


@pytest.mark.parametrize(("mutate", "needles"), [
    (lambda d: _set(d, "schema_version", 2), ["schema_version", "2"]),
    (lambda d: _drop(d, "schema_version"), ["schema_version"]),
    (lambda d: _set(d, "schema_version", 1.0), ["schema_version", "1.0"]),  # was read as 1
    # a study file given to train --config: "missing key schema_version"
    (lambda d: {"study": {"name": "q"}, "problem": d["problem"]}, ["this is a study file"]),
    (lambda d: _drop(d, "dmd"), ["[dmd]"]),
    (lambda d: _drop(d, "problem"), ["[problem]"]),
    (lambda d: _set(d, "extras", {}), ["extras"]),
    (lambda d: _set(d, "dmd", [1, 2]), ["[dmd]", "[1, 2]"]),
    (lambda d: _set(d, "dmd.foo", 1), ["dmd.foo", "1"]),
    (lambda d: _set(d, "provenance.who", "me"), ["provenance.who", "me"]),
    (lambda d: _drop(d, "training.lr"), ["training.lr"]),
    (lambda d: _set(d, "dmd.rank", 12), ["dmd.rank", "12"]),
    (lambda d: _set(d, "dmd.window", "ten"), ["dmd.window", "ten"]),
    (lambda d: _set(d, "dmd.horizon", -5), ["dmd.horizon", "-5"]),
    (lambda d: _set(d, "dmd.line_search", 5), ["dmd.line_search", "5"]),
    (lambda d: _set(d, "dmd.line_search", [1, "x"]), ["dmd.line_search", "x"]),
    (lambda d: _set(d, "training.lr", -0.1), ["training.lr", "-0.1"]),
    (lambda d: _set(d, "training.optimizer", "lbfgs"), ["training.optimizer", "lbfgs"]),
    (lambda d: _set(d, "model.width", 0), ["model.width", "0"]),
    (lambda d: _set(d, "problem.grid", 2), ["problem.grid", "2"]),
    (lambda d: _set(d, "problem.diffusivity", [0.1]), ["problem.diffusivity", "0.1"]),
    (lambda d: _set(d, "expected.val_rel_l2", "low"), ["expected.val_rel_l2", "low"]),
    (lambda d: _set(d, "expected.cpu_threads", 0), ["expected.cpu_threads", "0"]),
    (lambda d: _set(d, "expected.val_rel_l2", "-inf"), ["expected.val_rel_l2", "-inf"]),
    (lambda d: _set(d, "expected.cost_bpe", "-inf"), ["expected.cost_bpe", "-inf"]),
    (lambda d: _set(d, "model.activation", ["tanh"]), ["model.activation", "['tanh']"]),
    (lambda d: _set(d, "model.width", 2**63), ["model.width", str(2**63)]),
    (lambda d: _set(d, "expected.cpu_threads", 2.5), ["expected.cpu_threads", "2.5"]),
    (lambda d: _set(d, "expected.cpu_capability", 512), ["expected.cpu_capability", "512"]),
    (lambda d: _set(d, "expected.val_rel_l2", 0), ["expected.val_rel_l2", "> 0", "0"]),
    (lambda d: _set(d, "expected.max_steps", 0), ["expected.max_steps", "0"]),
    (lambda d: _set(d, "expected.max_steps", 1.5), ["expected.max_steps", "1.5"]),
    (lambda d: _set(d, "expected.settings_hash", 7), ["expected.settings_hash", "7"]),
    (lambda d: _set(d, "provenance.trial_number", -1), ["provenance.trial_number", "-1"]),
])
def test_bad_values_are_one_line_naming_file_field_and_value(good, tmp_path, mutate, needles):
    path = _write_json(tmp_path, mutate(good))
    with pytest.raises(UserError) as info:
        load_tuned_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_an_expected_figure_of_a_newer_dmdopt_is_skipped_with_one_warning(good, tmp_path, caplog):
    """[expected] holds figures, not settings: a file exported by a newer dmdopt (which added
    cpu_capability to it here) must still run on an older one, as data it cannot compare."""
    import logging

    good["expected"]["flops_per_joule"] = 3.5
    with caplog.at_level(logging.WARNING):
        loaded = load_tuned_config(_write_json(tmp_path, good))
    assert "flops_per_joule" not in loaded.expected and loaded.expected["cpu_threads"] == 3
    assert [r.getMessage().count("flops_per_joule") for r in caplog.records] == [1]


def test_an_expected_nan_is_no_figure_to_compare(good, tmp_path):
    """Export wrote NaN as "nan"; such a file loads, without that figure."""
    good["expected"]["test_rel_l2"] = "nan"
    assert "test_rel_l2" not in load_tuned_config(_write_json(tmp_path, good)).expected


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("bad.toml", "schema_version = 1\n[dmd\n", "not valid TOML"),
    ("bad.json", '{"schema_version": 1,', "not valid JSON"),
    ("bad.yaml", "schema_version: 1\ndmd: [unclosed\n", "not valid YAML"),
    ("bad.yaml", "just a string\n", "expected a table"),
    ("bad.toml", "", "missing key schema_version"),
    ("bad.toml", 'schema_version = "1"\n', "unsupported schema_version '1'"),
    ("bad.toml", "schema_version = true\n", "unsupported schema_version True"),
])
def test_unparsable_files_are_one_line_errors(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_tuned_config(path)
    assert needle in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="not found.*nope.toml"):
        load_tuned_config(tmp_path / "nope.toml")
    (tmp_path / "cfg.ini").write_text("[dmd]\n")
    with pytest.raises(UserError, match=r"cfg\.ini.*'\.ini'"):
        load_tuned_config(tmp_path / "cfg.ini")


def test_hand_written_yaml_reads_exponents_and_needs_no_provenance(good, tmp_path):
    del good["provenance"], good["expected"]
    good["training"]["lr"] = "1e-3"  # what YAML 1.1 makes of an unquoted 1e-3
    good["training"]["batch_size"] = None
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(good).replace("'1e-3'", "1e-3"))
    assert "lr: 1e-3" in path.read_text()
    tuned = load_tuned_config(path)
    assert tuned.training.lr == 0.001 and tuned.provenance == {} and tuned.expected == {}


def test_a_yaml_settings_hash_that_looks_like_an_exponent_stays_text(good, tmp_path):
    """One hash in about 1,300 is digits with one `e` (379865906e614232): YAML 1.1 writes it
    unquoted and the exponent rule read it back as the float inf, so the YAML export of that
    trial failed its own read-back ('expected.settings_hash must be a string, got inf')."""
    good["expected"]["settings_hash"] = "379865906e614232"
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(good))
    assert "settings_hash: 379865906e614232" in path.read_text()  # unquoted, as PyYAML writes it
    assert load_tuned_config(path).expected["settings_hash"] == "379865906e614232"


def test_a_trial_recorded_with_a_rank_the_dmd_clipped_again_exports_the_rank_it_ran(summary,
                                                                                   tmp_path):
    """Before 2026-12-01 the search clipped ranks to window - 1 and recorded that; the DMD then
    ran window - 2. The study recommended such a trial, and its export was refused ('dmd.rank
    must be at most window - 2')."""
    summary["trials"][2]["user_attrs"]["dmd"]["rank"] = 11  # window 12
    tuned = export_tuned_config(summary, tmp_path / "tuned.toml", number=2)
    assert tuned.dmd.rank == 10 and load_tuned_config(tmp_path / "tuned.toml").dmd.rank == 10


def test_toml_writer_escapes_awkward_strings(summary, tmp_path):
    summary["study_name"] = 'we"ird\\na\tme\x7fé'
    path = tmp_path / "tuned.toml"
    tuned = export_tuned_config(summary, path)
    assert load_tuned_config(path).provenance["study_name"] == summary["study_name"]
    assert tuned.provenance["study_name"] == summary["study_name"]


def test_toml_writer_spells_characters_beyond_the_bmp_as_toml_does(summary, tmp_path):
    """json.dumps writes an emoji as a surrogate pair (\\ud83d\\ude00), which TOML refuses: the
    export of a study named with one failed its own read-back check."""
    summary["study_name"] = "q\U0001F600 é"
    path = tmp_path / "tuned.toml"
    export_tuned_config(summary, path)
    assert path.read_text(encoding="utf-8").isascii()
    assert load_tuned_config(path).provenance["study_name"] == "q\U0001F600 é"


def test_a_cost_to_target_export_states_the_speedup_of_the_cost_it_states(summary, tmp_path):
    """A cost_to_target point's cost is its spend to the study's target; the trial's recorded
    speedup is to the reference's own error, reached earlier. The file paired the point's
    cost with that other ratio, unlike the front and the dashboard."""
    from dmdopt.pareto import speedup

    trial = summary["trials"][2]  # 150 bpe to the target; the reference's error at 75
    trial["user_attrs"].update(cost_total=150.0, cost_to_reference=75.0, speedup=600.0 / 75.0)
    summary |= {"mode": "cost_to_target", "pareto": [2]}
    tuned = export_tuned_config(summary, tmp_path / "t.toml")
    assert tuned.expected["cost_bpe"] == 150.0
    assert tuned.expected["speedup"] == pytest.approx(600.0 / 150.0) == speedup(summary, trial)


def test_a_trial_recorded_before_the_growing_policy_exports_the_policy_it_ran(summary, tmp_path):
    """Before DMDConfig.growing existed the code dropped growing modes; the field's default is
    'auto' now (followed under SGD). An old trial's record has no key, and its export took
    today's default: settings the trial never ran."""
    del summary["trials"][2]["user_attrs"]["dmd"]["growing"]
    assert export_tuned_config(summary, tmp_path / "old.toml").dmd.growing == "drop"
    summary["trials"][2]["user_attrs"]["dmd"]["growing"] = "auto"  # recorded: kept
    assert export_tuned_config(summary, tmp_path / "new.toml").dmd.growing == "auto"


def test_provenance_names_the_code_that_ran_the_trial_not_the_exporting_one(summary, tmp_path):
    """An export after an upgrade recorded the exporting checkout's versions and commit beside
    the trial's figures; the trial's own record wins (older studies have none: export-time)."""
    import copy

    ran = {"versions": {"dmdopt": "0.0.1", "torch": "2.0.0"}, "git_commit": "ab" * 20}
    trial_summary = copy.deepcopy(summary)
    trial_summary["trials"][2]["user_attrs"]["code"] = ran
    prov = export_tuned_config(trial_summary, tmp_path / "t.toml").provenance
    assert prov["versions"] == ran["versions"] and prov["git_commit"] == ran["git_commit"]
    legacy = export_tuned_config(summary, tmp_path / "l.toml").provenance
    assert legacy["versions"]["dmdopt"] != "0.0.1"


def test_the_recorded_commit_says_when_the_code_differs_from_it(tmp_path):
    import subprocess

    from dmdopt._util import git_commit

    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    run("add", "f.py")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(tmp_path)
    assert clean is not None and len(clean) == 40
    (tmp_path / "f.py").write_text("x = 2\n")  # what a trial ran is no longer that commit
    assert git_commit(tmp_path) == clean + "-dirty"


def test_a_package_installed_inside_another_repository_names_no_commit(tmp_path):
    """dmdopt installed into a project's ignored `.venv` recorded the project's commit as the
    code every trial and export ran."""
    import subprocess

    from dmdopt._util import git_commit

    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    run("add", ".gitignore")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    package = tmp_path / ".venv" / "lib" / "site-packages" / "dmdopt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert git_commit(package) is None
    assert git_commit(tmp_path) is not None  # the project's own files still name it


def test_model_and_problem_are_the_ones_the_trials_ran_not_the_exporters_defaults(summary, tmp_path):
    """The study file names only some [model]/[problem] keys; an export filled the rest with
    the exporting dmdopt's defaults, so after a change of defaults it wrote a model and dataset
    the trials never trained. The study's stored `resolved` settings win (older studies have
    none: the exporter's defaults, as before)."""
    import copy

    from dmdopt.model import ModelConfig
    from dmdopt.problem import ProblemConfig

    ran_model = ModelConfig.from_dict(MODEL).to_dict() | {"activation": "relu"}
    ran_problem = ProblemConfig.from_dict(PROBLEM).to_dict() | {"source_width": 0.07}
    resolved_summary = copy.deepcopy(summary)
    resolved_summary["resolved"] = {"model": ran_model, "problem": ran_problem,
                                    "dataset_hash": "0123456789abcdef"}
    tuned = export_tuned_config(resolved_summary, tmp_path / "t.toml")
    assert tuned.model.to_dict() == ran_model and tuned.problem.to_dict() == ran_problem
    assert tuned.provenance["dataset_hash"] == "0123456789abcdef"  # the trials' solver's hash
    assert load_tuned_config(tmp_path / "t.toml").model.activation == "relu"
    legacy = export_tuned_config(summary, tmp_path / "l.toml")
    assert legacy.model == ModelConfig.from_dict(MODEL)
    assert legacy.provenance["dataset_hash"] == ProblemConfig.from_dict(PROBLEM).config_hash()


def test_from_config_needs_only_the_dmd_section_and_warns_on_another_optimiser(good, tmp_path):
    """A user's own loop has no regressor [model] or pollutant [problem]: a file of
    schema_version and [dmd] gives the accelerator its settings. Before, it was refused for
    each missing section and key in turn."""
    import warnings

    import torch

    from dmdopt import DMDAccelerator

    model = torch.nn.Linear(3, 2)
    dmd = DMDConfig(window=7, rank=3, horizon=40.0).to_dict()
    path = tmp_path / "dmd.json"
    path.write_text(json.dumps({"schema_version": good["schema_version"], "dmd": dmd}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no [training]: nothing to compare the optimiser with
        acc = DMDAccelerator.from_config(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert (acc.config.window, acc.config.rank, acc.config.horizon) == (7, 3, 40.0)
    # a section it does not use is not checked; a [dmd] key missing or unknown still is
    path.write_text(json.dumps({"schema_version": good["schema_version"], "dmd": dmd,
                                "model": {"width": "wide"}}))
    DMDAccelerator.from_config(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    path.write_text(json.dumps({"schema_version": good["schema_version"],
                                "dmd": {k: v for k, v in dmd.items() if k != "rank"}}))
    with pytest.raises(UserError, match=r"dmd\.json: missing key dmd\.rank"):
        DMDAccelerator.from_config(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    path.write_text(json.dumps({"schema_version": good["schema_version"]}))
    with pytest.raises(UserError, match=r"missing section \[dmd\]"):
        DMDAccelerator.from_config(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    # settings tuned for Adam handed to SGD: a warning naming both; AdamW is an Adam
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps(dict(good, training=dict(good["training"], optimizer="adam"))))
    with pytest.warns(UserWarning, match=r"tuned for training\.optimizer = 'adam'.* SGD"):
        DMDAccelerator.from_config(tuned, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DMDAccelerator.from_config(tuned, model, torch.optim.AdamW(model.parameters()))
    # plain GD and heavy ball are tuned apart: momentum on one side only is named
    tuned.write_text(json.dumps(dict(good, training=dict(good["training"], optimizer="sgd",
                                                         momentum=0.0))))
    with pytest.warns(UserWarning, match=r"'sgd' with momentum 0, and this optimiser is SGD "
                                         r"with momentum 0\.9"):
        DMDAccelerator.from_config(tuned, model, torch.optim.SGD(model.parameters(), lr=0.1,
                                                                 momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DMDAccelerator.from_config(tuned, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_no_first_passage_speedup_is_exported_where_none_was_measured(summary, tmp_path):
    """A study stored before the reference recorded its first passage: the fallback is the
    budget's ratio, which the file then stated again as the stricter one."""
    tuned = export_tuned_config(summary, tmp_path / "old.toml")
    assert "speedup_first_passage" not in tuned.expected and tuned.expected["speedup"] == 4.0
    summary["reference"]["first_passage_bpe"] = 300.0  # the trial's cost: 150 bpe
    tuned = export_tuned_config(summary, tmp_path / "new.toml")
    assert tuned.expected["speedup_first_passage"] == pytest.approx(2.0)
