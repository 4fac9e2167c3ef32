"""Study-file validation: each bad-input class is one line naming the key, exit 2, nothing created."""

from __future__ import annotations

import pytest
from study_files import tiny_study_toml

from dmdopt.cli import main
from dmdopt.errors import UserError
from dmdopt.search.config import load_study_file


def write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_valid_file_loads(tmp_path):
    config = load_study_file(write(tmp_path, tiny_study_toml()))
    assert config.name == "tiny" and config.space.window.high == 12
    assert config.space.horizon.include_inf and config.training.lr == 0.01


def test_shipped_studies_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "studies"
    names = sorted(p.stem for p in root.glob("*.toml"))
    assert {"quick", "default", "gpu"} <= set(names)
    for name in names:
        assert load_study_file(root / f"{name}.toml").name == name


BAD = [
    ("unknown top-level key", tiny_study_toml(extra="colour = 'red'"), "colour"),
    ("unknown section", tiny_study_toml() + "\n[extras]\nx = 1\n", "extras"),
    ("wrong type", tiny_study_toml().replace("n_trials = 3", 'n_trials = "three"'), "n_trials"),
    ("inverted range", tiny_study_toml().replace("low = 5\nhigh = 12", "low = 12\nhigh = 5"), "inverted"),
    ("empty horizon (non-positive)", tiny_study_toml().replace("low = 5.0", "low = 0.0"), "horizon.low"),
    ("target_error in the two-objective mode", tiny_study_toml(extra="target_error = 0.1"),
     "target_error applies only"),
    ("rank above window-2", tiny_study_toml().replace("low = 1\nhigh = 6", "low = 20\nhigh = 30"), "rank"),
    ("unknown sampler", tiny_study_toml().replace('sampler = "random"', 'sampler = "grid"'), "sampler"),
    ("bad training value", tiny_study_toml(training="lr = -1.0"), "training.lr"),
    ("unknown training key", tiny_study_toml(training="learning_rate = 0.1"), "learning_rate"),
    ("bad problem value", tiny_study_toml().replace("grid = 16", "grid = 2"), "grid"),
    ("searched knob fixed", tiny_study_toml() + "\n[dmd]\nwindow = 4\n", "dmd.window"),
    ("bad fixed DMD option", tiny_study_toml() + '\n[dmd]\ngrowing = "grow"\n', "dmd.growing"),
    ("unknown searched choice", tiny_study_toml().replace(
        "[search.window]", '[search]\ngrowing = ["drop", "grow"]\n\n[search.window]'), "'grow'"),
    ("not TOML", "[study\nname=", "not valid TOML"),
    ("missing window", tiny_study_toml().replace("[search.window]\nlow = 5\nhigh = 12", ""), "window"),
    # keys a range table does not read were accepted and silently ignored
    ("log on the horizon (always log)", tiny_study_toml().replace("include_inf = true",
                                                                  "include_inf = true\nlog = false"),
     "horizon: unknown key 'log'"),
    ("log on the rank (always linear)", tiny_study_toml().replace("low = 1\nhigh = 6",
                                                                  "low = 1\nhigh = 6\nlog = true"),
     "rank: unknown key 'log'"),
    ("include_inf on the window", tiny_study_toml().replace("low = 5\nhigh = 12",
                                                            "low = 5\nhigh = 12\ninclude_inf = true"),
     "window: unknown key 'include_inf'"),
    # a curve of one point at the end: every trial cost its whole budget
    ("eval_every past the budget", tiny_study_toml(training='max_steps = 60\neval_every = 60'),
     "eval_every = 60 is not below max_steps = 60"),
    # a tuned config given to study run: "unknown key 'expected'"
    ("a tuned config", 'schema_version = 1\n[dmd]\nwindow = 5\n', "this is a tuned config"),
    # a SQL MLflow store's run names hold 250 characters: the study ran, tracking failed for good
    ("a name past MLflow's limit", tiny_study_toml("x" * 251), "at most 250 characters"),
    # nan passed `<= 0` and failed every trial after training, at set_constraint
    ("max_error_ratio nan", tiny_study_toml(extra="max_error_ratio = nan"), "max_error_ratio"),
    # the samplers' RNGs take 32 bits: seed 2**32 gave exactly seed 0's trials
    ("seed 2**32", tiny_study_toml().replace("seed = 0", "seed = 4294967296", 1), "seed must be"),
    ("seed negative", tiny_study_toml().replace("seed = 0", "seed = -1", 1), "seed must be"),
    # a window past the budget never jumps; near 2**63 every trial failed with a traceback
    ("window past the budget", tiny_study_toml().replace("high = 12", "high = 9223372036854775807", 1),
     "exceeds training.max_steps"),
    ("problem not a table", "problem = 5\n" + tiny_study_toml().replace(
        "[problem]\ngrid = 16\nn_samples = 60", ""), "problem must be a table"),
    ("line_search not a list", tiny_study_toml() + "\n[dmd]\nline_search = 4.0\n",
     "line_search must be a list"),
    # the reference and every trial stopped at it: both objectives then meant something else
    ("target_error under [training]", tiny_study_toml(training="target_error = 0.5"),
     "training.target_error does not apply in a study file"),
    # the trial's choice silently replaced the fixed value
    ("a fixed option also searched", tiny_study_toml().replace(
        "[search.window]", '[search]\ngrowing = ["drop", "drift"]\n\n[search.window]')
     + '\n[dmd]\ngrowing = "drift"\n', "dmd.growing = 'drift' is also searched"),
    # a warm-up as long as the run: DMD never ran
    ("warm-up past the budget", tiny_study_toml() + "\n[dmd]\nwarmup = 1000\n",
     "after dmd.warmup = 1000 exceeds training.max_steps"),
    ("rank not a table", tiny_study_toml().replace("[search.rank]\nlow = 1\nhigh = 6", "")
     .replace("[search.window]", "[search]\nrank = 5\n\n[search.window]"), "rank must be a table"),
]


@pytest.mark.parametrize(("label", "text", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_one_clear_error(tmp_path, label, text, needle):
    with pytest.raises(UserError) as info:
        load_study_file(write(tmp_path, text))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_cli_bad_file_exit_2_and_nothing_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, tiny_study_toml().replace("low = 5\nhigh = 12", "low = 12\nhigh = 5"))
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "window" in err
    assert not (tmp_path / "dmdopt-runs").exists()


def test_cli_missing_file_exit_2(tmp_path, capsys):
    assert main(["study", "run", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "quick" in err  # names the shipped studies


def test_a_shipped_study_runs_by_name_from_any_folder_and_a_local_file_wins(tmp_path,
                                                                          monkeypatch):
    """`dmdopt study run quick` from a folder without `studies/` (it was 'not found')."""
    from pathlib import Path

    from dmdopt.search.config import shipped_studies

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2] / "studies"
    assert {n: p.resolve() for n, p in shipped_studies().items()} == \
        {p.stem: p.resolve() for p in root.glob("*.toml")}
    for spelled in ("quick", "quick.toml"):
        assert load_study_file(spelled).raw == load_study_file(root / "quick.toml").raw
    (tmp_path / "quick.toml").write_text(tiny_study_toml(name="mine"))
    assert load_study_file("quick.toml").name == "mine"  # a file here is the file meant
    for path in ("sub/quick.toml", "./default.toml"):  # a path is a path, never a shipped name
        with pytest.raises(UserError, match="not found"):
            load_study_file(path)
    # a checkout on PYTHONPATH, where `dmdopt.studies` is not mapped: the repository's folder
    import importlib.resources

    def unmapped(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", unmapped)
    assert sorted(shipped_studies()) == sorted(p.stem for p in root.glob("*.toml"))
    assert load_study_file("default").name == "default"


def test_searched_growing_policy_reaches_the_dmd_config(tmp_path):
    import optuna

    from dmdopt.search.objective import suggest_dmd

    text = tiny_study_toml().replace("[search.window]",
                                     '[search]\ngrowing = ["drop", "drift"]\n\n[search.window]')
    config = load_study_file(write(tmp_path, text))
    assert config.space.growing == ("drop", "drift")
    trial = optuna.trial.FixedTrial({"window": 6, "rank": 6, "horizon": 10.0,
                                     "horizon_inf": False, "growing": "drift"})
    dmd = suggest_dmd(trial, config)
    assert (dmd.growing, dmd.window, dmd.rank) == ("drift", 6, 4)  # rank clipped to window - 2


def test_a_study_made_with_a_now_refused_range_key_resumes_without_it(tmp_path):
    """Earlier versions ignored `[search.horizon] log`; now it is refused, and removing it
    from the file must not make the study "a different configuration"."""
    import hashlib
    import json

    from dmdopt.search import run_study

    path = write(tmp_path, tiny_study_toml(n_trials=1))
    config = load_study_file(path)
    study = run_study(config, tracking=False, progress=False, echo=lambda *_: None,
                      storage=f"sqlite:///{tmp_path}/o.db", cache_dir=tmp_path / "data")
    # what the older version stored for the same file with `log = true` under the horizon
    old_raw = json.loads(json.dumps(config.raw))
    old_raw["search"]["horizon"]["log"] = True
    hashed = dict(old_raw, study={k: v for k, v in old_raw["study"].items()
                                  if k not in ("storage", "n_trials", "timeout")})
    study.set_user_attr("config", old_raw)
    study.set_user_attr("config_digest", hashlib.sha256(
        json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16])
    resumed = run_study(config, n_trials=2, tracking=False, progress=False, echo=lambda *_: None,
                        storage=f"sqlite:///{tmp_path}/o.db", cache_dir=tmp_path / "data")
    assert len(resumed.trials) >= 2


def test_the_line_search_choices_include_the_default_ladder(tmp_path):
    """The presets only shrink the horizon; `default` is DMDConfig's ladder (x1/4 .. x1024)."""
    from dmdopt.search.config import LINE_SEARCH_PRESETS
    from dmdopt.training.config import DMDConfig

    text = tiny_study_toml().replace("[search.window]",
                                     '[search]\nline_search = ["default", "none"]\n\n[search.window]')
    assert load_study_file(write(tmp_path, text)).space.line_search == ("default", "none")
    assert LINE_SEARCH_PRESETS["default"] == DMDConfig().line_search


def test_a_study_file_with_a_byte_order_mark_reads(tmp_path):
    """Windows editors write one; tomllib called it an 'Invalid statement' at line 1."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + tiny_study_toml().encode())
    assert load_study_file(path).name == "tiny"
